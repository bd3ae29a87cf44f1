"""label-studio-sahi: a Label Studio ML backend with slicing-aided DETR detection."""

__version__ = "0.1.0"
