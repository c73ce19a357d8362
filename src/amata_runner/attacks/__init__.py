"""Attacks as pure functions on tensors: images in [0,1] in, adversarial images in [0,1] out."""

from amata_runner.attacks.pgd import attack_mode, frozen_parameters, pgd_linf

__all__ = ["attack_mode", "frozen_parameters", "pgd_linf"]
