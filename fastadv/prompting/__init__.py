"""fastadv.prompting: label-mapping visual prompting (LM-VP) — reprogram a frozen pre-trained source
classifier for a target task with a learnable visual prompt and a label mapping, train it with standard,
white-box adversarial or transferred adversarial training, and evaluate its robustness and privacy.

==========================  ===========================================================================
``VisualPrompt``            the prompt: geometries ``ilm`` / ``tarp`` / ``pad``, one ``fastadv.ops.prompt_pad``
``make_mapping`` & classes  label mappings ``rlm`` / ``flm`` / ``ilm`` / ``linear``; ``greedy_assignment``
``LMVPModel``               prompt → frozen source → mapping; ``load_source`` (timm / torchvision / fastadv)
``LMVPConfig``              every knob of a run; presets ``tarp_vp`` (defaults) and ``ilm_vp``
``train_lmvp``              ST, white-box AT and transferred AT through fastadv.train's Trainer (SAM,
                            schedules, bf16, channels_last, checkpoints, resume)
``evaluate_lmvp``           natural, PGD-10/20, CW-20, transferred PGD-20, MIA (natural + adversarial)
``run_lmvp``                data → model → training → evaluation → ``out_dir/result.json``
==========================  ===========================================================================

Where fastadv deliberately differs from the reference code (SPECS §3): attacks perturb the image in pixel
space ``[0, 1]`` before it is placed on the canvas (never the normalised canvas with a ``[0, 1]`` clamp); the
threat model of transferred AT must be trained (a named threat model needs its checkpoint); the canvas is built
on the model's device in one ``fastadv.ops.prompt_pad`` pass; the frozen source network is never copied.

Typical use::

    from fastadv.prompting import LMVPConfig, run_lmvp
    result = run_lmvp(LMVPConfig.tarp_vp(dataset="cifar10", data_dir="data", source="resnet50", pretrained=True,
                                         source_checkpoint="resnet50.pth", method="transfer_at",
                                         threat_model="resnet18", threat_checkpoint="rn18_cifar.pt",
                                         out_dir="runs/tarp"))
"""

from .config import LMVPConfig
from .evaluate import build_eval_attacks, evaluate_lmvp
from .mapping import (
    MAPPINGS,
    FrequencyMapping,
    IterativeMapping,
    LabelMapping,
    LinearMapping,
    OneToOneMapping,
    RandomMapping,
    greedy_assignment,
    label_counts,
    make_mapping,
    source_label_counts,
)
from .model import LMVPModel, check_threat_model, load_source, load_threat_model
from .prompt import GEOMETRIES, VisualPrompt
from .run import build_model, run_lmvp
from .train import (
    TRAIN_METHODS,
    LMVPPGDAT,
    LMVPStandard,
    LMVPTransferAT,
    lr_milestones,
    natural_accuracy,
    register_lmvp_methods,
    to_train_config,
    train_lmvp,
)

__all__ = [
    "GEOMETRIES",
    "LMVPPGDAT",
    "LMVPStandard",
    "LMVPTransferAT",
    "TRAIN_METHODS",
    "MAPPINGS",
    "FrequencyMapping",
    "IterativeMapping",
    "LMVPConfig",
    "LMVPModel",
    "LabelMapping",
    "LinearMapping",
    "OneToOneMapping",
    "RandomMapping",
    "VisualPrompt",
    "build_eval_attacks",
    "build_model",
    "check_threat_model",
    "evaluate_lmvp",
    "greedy_assignment",
    "label_counts",
    "load_source",
    "load_threat_model",
    "lr_milestones",
    "make_mapping",
    "natural_accuracy",
    "register_lmvp_methods",
    "run_lmvp",
    "source_label_counts",
    "to_train_config",
    "train_lmvp",
]
