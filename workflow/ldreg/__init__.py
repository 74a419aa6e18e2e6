"""ldreg: light-weight deformable registration (LDR) distilled from a recursive cascaded
teacher (RCN) with adversarial learning (ALDK), for fast 3D registration on a CPU."""

__version__ = "0.1.0"
