"""fastadv.attacks: the attack engine and the attacks built on it.

Every attack is a callable object, ``adv = PGD(model, eps=8/255, alpha=2/255, steps=10)(x, y)``, on pixel-space
inputs in ``[0, 1]``; see :mod:`fastadv.attacks.base` for what the engine guarantees (input-only gradients,
model state restored, private generator, autocast, fused updates through :mod:`fastadv.ops`).

==================  =====================================================================================
``FGSM``            one signed step (FGSM-RS with ``random_start=True``)
``PGD``             L∞ / L2, losses ``ce`` / ``cw`` / ``dlr``, restarts, targeted, early stop, CUDA graphs
``APGD``            Auto-PGD (CE / DLR / CW), checkpoints and step halving per the paper
``APGDT``           targeted-DLR APGD over the 9 most likely wrong classes
``FAB``             targeted FAB (FAB-T), minimal-distortion, as AutoAttack runs it
``Square``          score-based random search, L∞ and L2
``AutoAttack``      the standard protocol, per-attack robust accuracy
``MMA``             minimum-margin attack over the top-3 wrong classes
``TransferAttack``  craft on a threat model, evaluate on a target model
==================  =====================================================================================
"""

from .apgd import APGD, APGDT, apgd_checkpoints
from .autoattack import AutoAttack, AutoAttackResult
from .base import Attack, attack_mode
from .fab import FAB, project_to_hyperplane
from .losses import LOSSES, ce_loss, cw_loss, dlr_loss, margin, targeted_cw_loss, targeted_dlr_loss
from .mma import MMA
from .pgd import FGSM, PGD
from .square import Square, square_fraction
from .transfer import TransferAttack

__all__ = [
    "APGD",
    "APGDT",
    "FAB",
    "FGSM",
    "LOSSES",
    "MMA",
    "PGD",
    "Attack",
    "AutoAttack",
    "AutoAttackResult",
    "Square",
    "TransferAttack",
    "apgd_checkpoints",
    "attack_mode",
    "ce_loss",
    "cw_loss",
    "dlr_loss",
    "margin",
    "project_to_hyperplane",
    "square_fraction",
    "targeted_cw_loss",
    "targeted_dlr_loss",
]
