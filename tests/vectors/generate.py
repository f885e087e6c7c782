"""Write the wire-format test vectors in this folder: `python tests/vectors/generate.py`.

Each vector is `<name>.bin` (a payload exactly as sent over MQTT) and `<name>.json` (what a
decoder must get from it: the header, the raw wire tensors of the safetensors body, and the
decoded dense float32 tensors, as nested lists). Inputs come from integer arithmetic, not a
random generator, so regenerating gives the same JSON on any platform; the zstd bytes may
differ between zstd versions, which is why tests compare decoded values, never payload bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import zstandard

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from protocol import codec  # noqa: E402
from protocol.messages import GlobalModel, TrainConfig, Update  # noqa: E402

VECTOR_DIR = Path(__file__).resolve().parent
MANIFEST_SHA256 = "5f2b7c0e9a41d3861f0c2e7b4a9d58e63c1b07f2a4e9d6c3b8a0f1e2d3c4b5a6"
# Small stand-ins for the CNN adapter's tensors: a LoRA pair, and a bias.
SHAPES = {"fc1.lora_A.weight": (2, 6), "fc1.lora_B.weight": (4, 2), "head.bias": (3,)}
# Output rows of B differ in magnitude, as in trained adapters: what int8-channel is for.
ROW_MAGNITUDE = {"fc1.lora_B.weight": (1.0, 0.1, 0.01, 0.5)}
# name: (encoding, topk, is_delta)
UPDATE_VECTORS = {
    "update-fp32": ("fp32", None, False),
    "update-fp16": ("fp16", None, True),
    "update-int8": ("int8", None, True),
    "update-int8-channel": ("int8-channel", None, True),
    "update-fp32-topk": ("fp32", 0.25, True),
    "update-int8-channel-topk": ("int8-channel", 0.5, True),
    "update-fp32-task": ("fp32", None, True),  # an FL-TAC device's update for its slot "t1"
}
TASK_OF = {"update-fp32-task": "t1"}
# name: (online, device id, problem)
STATUS_VECTORS = {
    "status-offline": (False, "phone-0", None),  # the will
    "status-manifest": (True, "phone-1", "manifest"),  # online, artifacts of another model
}
WIRE_KEYS = ("frame", "metadata", "header", "wire_tensors")
_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "int8": "I8", "int32": "I32"}


def make_tensors(seed: int, amplitude: float) -> dict[str, np.ndarray]:
    """Deterministic tensors: a fixed integer sequence mapped into [-amplitude, amplitude]."""
    tensors = {}
    for offset, (name, shape) in enumerate(SHAPES.items()):
        n = int(np.prod(shape))
        # A multiplicative sequence mod a prime: spread-out integers in 0..996, no RNG involved.
        ints = [(seed * 7919 + (offset * 31 + i + 1) * 104729) % 997 for i in range(n)]
        values = np.array([(k - 498) / 498 * amplitude for k in ints], np.float64).reshape(shape)
        for row, factor in enumerate(ROW_MAGNITUDE.get(name, ())):
            values[row] *= factor
        tensors[name] = values.astype(np.float32)
    return tensors


def make_update(name: str) -> tuple[Update, str, float | None]:
    """The update message of one vector, and the encoding and topk it is sent with."""
    encoding, topk, is_delta = UPDATE_VECTORS[name]
    index = list(UPDATE_VECTORS).index(name)
    update = Update(
        federation="vectors", round=3, device_id=f"phone-{index}",
        manifest_sha256=MANIFEST_SHA256, num_samples=96, update_id=f"phone-{index}-3-a1b2c3",
        adapter=make_tensors(index + 1, 0.02 if is_delta else 0.5),
        metrics={"train_loss": 0.625, "train_accuracy": 0.75}, is_delta=is_delta,
        task=TASK_OF.get(name, ""),
    )
    return update, encoding, topk


def make_global() -> GlobalModel:
    """The global message vector: round 4, asking devices for int8-channel top-25% deltas."""
    train = TrainConfig(local_steps=20, learning_rate=0.05, update_encoding="int8-channel",
                        update_topk=0.25)
    return GlobalModel("vectors", 4, MANIFEST_SHA256, make_tensors(100, 0.5), train, final=False)


def make_fltac_global() -> GlobalModel:
    """A global of an FL-TAC federation that also runs a task schedule (every optional field).

    Two cluster adapters; phone-0's slot t0 starts from cluster 1, phone-1 from cluster 0, and
    any other slot from the plain adapter. Task 1 of the schedule trains classes 2 and 3.
    """
    return GlobalModel("vectors", 5, MANIFEST_SHA256, make_tensors(200, 0.5), TrainConfig(),
                       clusters=(make_tensors(201, 0.5), make_tensors(202, 0.5)),
                       assignment={"phone-0/t0": 1, "phone-1": 0}, task_index=1,
                       task_classes=(2, 3))


def _nested(array: np.ndarray) -> Any:
    return array.astype(np.float64 if array.dtype.kind == "f" else np.int64).tolist()


def describe(payload: bytes) -> dict[str, Any]:
    """What any decoder must read from a zstd/safetensors payload: frame, metadata, tensors."""
    # Exactly one frame and nothing after it; zstd checks the content checksum when present.
    raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=1 << 20,
                                                  allow_extra_data=False)
    length = int.from_bytes(raw[:8], "little")
    metadata = json.loads(raw[8 : 8 + length])["__metadata__"]
    wire = safetensors.numpy.load(raw)
    return {
        "frame": {"checksum": zstandard.get_frame_parameters(payload).has_checksum},
        "metadata": {"schema": metadata["schema"], "kind": metadata["kind"]},
        "header": json.loads(metadata["header"]),
        "wire_tensors": {
            name: {"dtype": _DTYPE_NAMES[str(a.dtype)], "shape": list(a.shape), "data": _nested(a)}
            for name, a in sorted(wire.items())
        },
    }


def build_vectors() -> dict[str, tuple[bytes, dict[str, Any]]]:
    """Every vector as (payload, expected JSON object), built by the current codec."""
    vectors: dict[str, tuple[bytes, dict[str, Any]]] = {}
    for name in UPDATE_VECTORS:
        update, encoding, topk = make_update(name)
        payload = codec.encode_update(update, encoding=encoding, topk=topk)
        decoded = codec.decode_update(payload)
        vectors[name] = (payload, {
            "kind": "update", "file": f"{name}.bin", **describe(payload),
            "tensors": {k: _nested(v) for k, v in sorted(decoded.adapter.items())},
        })
    payload = codec.encode_global(make_global())
    decoded_global = codec.decode_global(payload)
    vectors["global"] = (payload, {
        "kind": "global", "file": "global.bin", **describe(payload),
        "tensors": {k: _nested(v) for k, v in sorted(decoded_global.adapter.items())},
    })
    payload = codec.encode_global(make_fltac_global())
    decoded_global = codec.decode_global(payload)
    vectors["global-fltac"] = (payload, {
        "kind": "global", "file": "global-fltac.bin", **describe(payload),
        "tensors": {k: _nested(v) for k, v in sorted(decoded_global.adapter.items())},
        "clusters": [{k: _nested(v) for k, v in sorted(c.items())}
                     for c in decoded_global.clusters],
    })
    for name, (online, device_id, problem) in STATUS_VECTORS.items():
        status = codec.encode_status(online, device_id, problem)
        vectors[name] = (status, {
            "kind": "status", "file": f"{name}.bin", "text": status.decode(),
            "device_id": device_id, "online": online, "problem": problem,
        })
    return vectors


def to_json(expected: dict[str, Any], depth: int = 0) -> str:
    """The JSON text of one vector: sorted keys, objects opened two levels deep, one leaf a line."""
    if not isinstance(expected, dict) or depth == 2 or not expected:
        return json.dumps(expected, sort_keys=True)
    pad = " " * (depth + 1)
    items = [f"{pad}{json.dumps(k)}: {to_json(v, depth + 1)}" for k, v in sorted(expected.items())]
    text = "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    return text + "\n" if depth == 0 else text


def _same_content(path: Path, expected: dict[str, Any]) -> bool:
    # zstd output, and the order safetensors writes metadata in, vary between runs: a payload
    # is the same vector when it *describes* the same, not when its bytes are equal.
    if not path.exists():
        return False
    payload = path.read_bytes()
    if expected["kind"] == "status":
        return payload.decode() == expected["text"]
    return describe(payload) == {k: expected[k] for k in WIRE_KEYS}


def main() -> None:
    """Write every vector's .json, and its .bin unless the existing one already matches."""
    for name, (payload, expected) in build_vectors().items():
        path = VECTOR_DIR / f"{name}.bin"
        if _same_content(path, expected):
            print(f"{name}: unchanged")
        else:
            path.write_bytes(payload)
            print(f"{name}: wrote {len(payload)} bytes")
        (VECTOR_DIR / f"{name}.json").write_text(to_json(expected))


if __name__ == "__main__":
    main()
