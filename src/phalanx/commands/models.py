"""`phalanx models`: the house, torchvision and timm models, or those matching a pattern."""
from __future__ import annotations

from phalanx.commands.args import Command, Parsed, Spec
from phalanx.models import listing


def models(p: Parsed) -> int:
    for line in listing(p.positional[0] if p.positional else ""):
        print(line)
    return 0


MODELS = Spec("phalanx models [PATTERN]", """Without PATTERN: the house models and a curated list of torchvision's, with their parameters (10 classes,
3 channels, 32x32 images, --model.width 32), and what timm offers when it is installed.
With PATTERN (a wildcard such as '*convnext*' or 'resnet5*'): every torchvision and timm model name matching it.
Any torchvision classification model works by name (--model.name resnet50); timm's as --model.name timm:NAME.""",
              positionals=(0, 1))

COMMANDS = {"models": Command(MODELS, models)}
