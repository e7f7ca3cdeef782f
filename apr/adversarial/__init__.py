"""Adversarial robustness: the fast-FGSM training perturbation and PGD / AutoAttack evaluation.

- :mod:`apr.adversarial.attacks`: ``fgsm_perturb`` / ``FGSMPerturbation`` (what ``train_step`` plugs in),
  ``pgd_attack``, ``catastrophic_overfitting_check``, ``autoattack`` (the ``pyautoattack`` package);
- :mod:`apr.adversarial.run`: robust accuracy of a checkpoint -> ``<run_name>.adv.json`` (``apr.adv/1``),
  resumable per attack, with gradient-masking flags;
- ``python -m apr.adversarial --help``: the command.
"""

from apr.adversarial.attacks import (AdversarialError, FGSMPerturbation, autoattack, catastrophic_overfitting_check,
                                     fgsm_perturb, parse_eps, pgd_attack)
from apr.adversarial.run import SCHEMA, build_attacks, evaluate_attacks, masking_flags, stratified_subset

__all__ = ["AdversarialError", "FGSMPerturbation", "fgsm_perturb", "pgd_attack", "catastrophic_overfitting_check",
           "autoattack", "parse_eps", "SCHEMA", "build_attacks", "evaluate_attacks", "masking_flags",
           "stratified_subset"]
