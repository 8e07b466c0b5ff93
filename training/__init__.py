"""The model, its data, the trainer, the evaluator, fine-tuning and the import of the CLIP4STR
authors' weights. These need the ``train`` extra (PyTorch, open_clip, ...): run as a command
in an install without it, a module says so in one line and exits 2."""

from __future__ import annotations

from runtime.extras import command_being_run, refuse_missing

TORCH = (("torch", "torch"), ("open_clip", "open_clip_torch"), ("safetensors", "safetensors"))
#: what each command needs beyond PyTorch and open_clip (every training command needs those)
NEEDS = {
    "training.finetune": (*TORCH, ("rapidocr", "rapidocr"), ("onnx", "onnx"), ("onnxslim", "onnxslim")),
    "training.frozen_tower": (*TORCH, ("rapidocr", "rapidocr")),
}

#: the extra that installs what a command needs, where it is not ``train``
EXTRAS = {"training.finetune": "export"}

refuse_missing("training", NEEDS, EXTRAS.get(command_being_run() or "", "train"), default=TORCH)
