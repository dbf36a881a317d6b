"""DiffSeg: weakly supervised skin-lesion segmentation from diffusion noise differences."""

__version__ = "0.1.0"
