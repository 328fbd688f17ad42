"""mimo-harness: train, track, tune and serve MIMO-UNet deblurring models at scale."""

__version__ = "0.1.0"
