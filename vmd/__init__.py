"""vmd: mirrored virtual block volumes served over FUSE."""

__version__ = "0.1.0"
