"""Transfer (black-box) attacks: craft adversarial examples on a *threat model*, evaluate them on a target.

This is TARP-VP's black-box setting: the threat model is a separately trained network (e.g. a CIFAR
ResNet-18 or WRN-34-10) and the target model is never queried while crafting.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .base import Attack, attack_mode


class TransferAttack:
    """``TransferAttack(threat_model, attack_factory_or_attack, target_model)``.

    ``attack_factory_or_attack`` is an :class:`Attack` built on ``threat_model`` or a callable
    ``factory(threat_model) -> Attack``. Calling the transfer attack crafts on the threat model only;
    :meth:`evaluate` also measures the target's accuracy on the transferred examples.
    """

    def __init__(self, threat_model: nn.Module, attack_factory_or_attack: Attack | Callable[[nn.Module], Attack],
                 target_model: nn.Module) -> None:
        if not isinstance(threat_model, nn.Module) or not isinstance(target_model, nn.Module):
            raise TypeError("fastadv.attacks.TransferAttack: `threat_model` and `target_model` must be nn.Modules")
        if isinstance(attack_factory_or_attack, Attack):
            attack = attack_factory_or_attack
        elif callable(attack_factory_or_attack):
            attack = attack_factory_or_attack(threat_model)
            if not isinstance(attack, Attack):
                raise ValueError("fastadv.attacks.TransferAttack: the attack factory must return a "
                                 f"fastadv.attacks.Attack, got {type(attack).__name__}")
        else:
            raise ValueError("fastadv.attacks.TransferAttack: `attack_factory_or_attack` must be an Attack or a "
                             "callable threat_model -> Attack")
        if attack.model is not threat_model:
            raise ValueError("fastadv.attacks.TransferAttack: the attack must be built on `threat_model` (its "
                             "`model` is another module)")
        self.threat_model = threat_model
        self.target_model = target_model
        self.attack = attack

    @property
    def model(self) -> nn.Module:
        """The model the examples are evaluated on."""
        return self.target_model

    @property
    def eps(self) -> float:
        return self.attack.eps

    @property
    def norm(self) -> str:
        return self.attack.norm

    def __call__(self, x: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
        return self.attack(x, y, target)

    def with_eps(self, eps: float) -> TransferAttack:
        return TransferAttack(self.threat_model, self.attack.with_eps(eps), self.target_model)

    def config(self) -> dict:
        return {"attack": "TransferAttack", "crafted_with": self.attack.config()}

    def evaluate(self, x: Tensor, y: Tensor) -> dict:
        """Crafts on the threat model and returns accuracies (fractions): ``target_clean``,
        ``target_adversarial`` (the transfer robust accuracy), ``threat_clean`` and ``threat_adversarial``
        (white-box on the threat model), plus ``x_adv``."""
        adv = self(x, y)
        y = y.to(adv.device)
        out = {}
        for name, model in (("target", self.target_model), ("threat", self.threat_model)):
            with attack_mode(model), torch.no_grad():
                out[f"{name}_clean"] = float((model(x.to(adv.device)).argmax(1) == y).float().mean())
                out[f"{name}_adversarial"] = float((model(adv).argmax(1) == y).float().mean())
        out["x_adv"] = adv
        return out
