"""Paths and the papers' anchors shared by the reproduction parts (never computed here)."""

from __future__ import annotations

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DOCS = os.path.join(ROOT, "docs")
RESULTS = os.path.join(DOCS, "reproduction")
DOC_PATH = os.path.join(DOCS, "reproduction.md")

# --------------------------------------------------------------------------------------------
# Anchors (quoted from the issue / papers; never computed here)

#: Backsolve relative gradient error of ANODE's ResNet ODE block (conv-BN-ReLU x2), float32,
#: random init, measured with the original PyTorch code + torchdiffeq's adjoint.
ANCHOR_GRAD = {
    ("euler", 1): 0.44,
    ("euler", 2): 0.22,
    ("euler", 8): 0.056,
    ("euler", 32): 0.014,
    ("midpoint", 1): 0.041,
    ("midpoint", 2): 0.012,
    ("midpoint", 8): 5e-4,
    ("midpoint", 32): 4e-5,
}
ANCHOR_GRAD_X3 = {"euler_nt1_grad": 1.76, "euler_nt1_recon": 1.90}

#: CIFAR-10 test accuracy (%) baseline / Neural ODE / ANODE (ANODEv2 paper table, as
#: shown in the original ANODE repository).
ANCHOR_TABLE = {
    "alexnet": (87.03, 75.67, 88.02),
    "resnet4": (76.95, 47.37, 77.30),
    "resnet10": (88.10, 67.94, 88.60),
}
ANCHOR_SQNXT = (
    "SqueezeNext, RK2 (original repository's curves): ANODE ends at ≈ 0.89–0.90 test "
    "accuracy; Neural ODE oscillates between 0.4 and 0.75 and ends ≈ 0.5."
)
