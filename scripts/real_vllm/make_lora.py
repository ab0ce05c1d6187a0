"""Write a small LoRA adapter for the tiny chat model, in PEFT's on-disk format.

    $VLLM_VENV/bin/python scripts/real_vllm/make_lora.py OUT_DIR BASE_MODEL_DIR [SEED]

``peft`` is not in the vLLM venv, so the two files PEFT would save are written with torch
and safetensors (both are): ``adapter_config.json`` (``peft_type`` LORA, rank 8, the
attention's ``q_proj`` and ``v_proj``) and ``adapter_model.safetensors`` with the
``base_model.model.model.layers.<i>.self_attn.<module>.lora_A|lora_B.weight`` tensors,
random from ``SEED``. vLLM 0.32.0's CPU build serves it with ``--enable-lora
--max-lora-rank 8`` (``--lora-modules NAME=OUT_DIR`` or ``POST /v1/load_lora_adapter``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

RANK = 8


def make_adapter(out: Path, base: Path, seed: int = 0) -> Path:
    config = json.loads((base / "config.json").read_text())
    hidden = config["hidden_size"]
    head = hidden // config["num_attention_heads"]
    outputs = {"q_proj": hidden, "v_proj": config["num_key_value_heads"] * head}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, size in outputs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, hidden,
                                                             generator=generator) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(size, RANK,
                                                             generator=generator) * 0.1
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK,
        "lora_dropout": 0.0, "target_modules": list(outputs), "bias": "none",
        "fan_in_fan_out": False, "base_model_name_or_path": str(base),
        "modules_to_save": None, "use_rslora": False, "use_dora": False,
        "inference_mode": True}))
    return out


if __name__ == "__main__":
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    print(make_adapter(Path(sys.argv[1]), Path(sys.argv[2]), seed))
