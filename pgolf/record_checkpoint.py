"""A record's own `final_model.pt` in pgolf's parameter names.

The records from #1855 on keep every block's matrices in four parameter banks (`qo_bank` holds the
query then the output projections of all layers, `kv_bank` the keys then the values, `mlp_up_bank` and
`mlp_down_bank` the MLP), and name the SmearGate's tensors at the model's top level. pgolf's model keeps
the challenge baseline's per-block names, so a record's state dict is unbanked and renamed here, then
loads strictly. Any other record tensor already carries the name pgolf uses.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from pgolf.errors import DataError

BANKS = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
# bank -> the per-block names of its first and second halves (layer i, then layer n + i)
BANK_LAYOUT = {
    "qo_bank": ("attn.c_q.weight", "attn.proj.weight"),
    "kv_bank": ("attn.c_k.weight", "attn.c_v.weight"),
    "mlp_up_bank": ("mlp.fc.weight", None),
    "mlp_down_bank": ("mlp.proj.weight", None),
}
RENAMES = {"smear_gate.weight": "smear.smear_gate_w", "smear_lambda": "smear.smear_lambda"}


def is_record_state(state: Mapping[str, Tensor]) -> bool:
    return any(name in state for name in (*BANKS, *RENAMES))


def from_record_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """pgolf's names for a record's state dict (a pgolf or baseline state dict passes through)."""
    if not is_record_state(state):
        return dict(state)
    layers = _bank_layers(state)
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name in BANK_LAYOUT:
            first, second = BANK_LAYOUT[name]
            for i in range(layers):
                out[f"blocks.{i}.{first}"] = tensor[i]
                if second is not None:
                    out[f"blocks.{i}.{second}"] = tensor[layers + i]
        else:
            out[RENAMES.get(name, name)] = tensor
    return out


def _bank_layers(state: Mapping[str, Tensor]) -> int:
    if "mlp_up_bank" not in state:
        return 0
    layers = int(state["mlp_up_bank"].shape[0])
    for name in ("qo_bank", "kv_bank"):
        if name in state and int(state[name].shape[0]) != 2 * layers:
            raise DataError(f"the checkpoint's {name} holds {state[name].shape[0]} matrices, not 2 x {layers} layers",
                            hint="A record's banks hold two matrices per layer (#1855 onward); is the file complete?")
    return layers
