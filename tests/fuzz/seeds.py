#!/usr/bin/env python3
"""Seed corpora for keel's fuzz targets (tests/fuzz/fuzz_target.h).

  seeds.py TARGET OUT_DIR   writes TARGET's seeds into OUT_DIR: the committed corpus
                            (tests/fuzz/corpus/TARGET), the repository's own files of that kind
                            (tests/fixtures, configs/) and the literals the unit tests parse.
  seeds.py --commit         (re)writes the small generated seeds under tests/fuzz/corpus/.
"""
import glob
import hashlib
import json
import os
import re
import shutil
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "tests/fuzz/corpus")

# Repository files that are inputs of each target.
FILE_SEEDS = {
    "safetensors_header": [],  # fixture checkpoints are ~300 KB; the generated ones stay small
    "safetensors_index": ["tests/fixtures/hf/*/model.safetensors.index.json"],
    "model_config": ["tests/fixtures/hf/*/config.json", "tests/fixtures/hf-quant/*/config.json"],
    "quant_config": [],
    "tokenizer": ["tests/fixtures/tokenizers/*_*.json"],
    "tokenizer_config": [],
    "yaml_serve": ["configs/serve/*.yaml"],
    "yaml_deployment": ["configs/deployments/*.yaml"],
    "yaml_hardware": ["configs/hardware/*.yaml", "configs/engines/*.yaml",
                      "configs/validation/*.yaml"],
    "yaml_model": ["configs/models/*.yaml"],
    "http_request": [],
    "request_json": [],
    "routing_file": [],
    "calibration": [],
    "trace": [],
}


def raw_strings(test_file, pattern):
    """The R"(...)" literals of a unit test that match `pattern`."""
    text = open(os.path.join(ROOT, test_file)).read()
    return [s for s in re.findall(r'R"\((.*?)\)"', text, re.S) if re.search(pattern, s)]


def safetensors(tensors, pad_to=8):
    header, data = {}, b""
    for name, dtype, shape, payload in tensors:
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    text = json.dumps(header).encode()
    text += b" " * ((pad_to - len(text) % pad_to) % pad_to)
    return struct.pack("<Q", len(text)) + text + data


def routing_file():
    header = json.dumps({"model": "tiny", "num_layers": 2, "moe_layers": [0, 1],
                         "num_experts": 4, "top_k": 2}).encode()
    record = json.dumps({"request_id": "r", "seq_id": 0, "prompt_token_ids": [1, 2],
                         "output_token_ids": [3], "sampling": {"temperature": 0, "top_p": 1,
                         "top_k": -1, "seed": 7}, "logits_digest": "", "num_tokens": 2}).encode()
    rows = b""
    for _ in range(2 * 2):  # tokens x MoE layers
        rows += struct.pack("<2i2ff", 0, 3, 0.75, 0.25, 0.5)
    return (b"KEELROUT" + struct.pack("<II", 1, len(header)) + header +
            struct.pack("<I", len(record)) + record + rows)


def generated():
    """Small seeds written by hand for the targets the repository has no small files for."""
    bf16 = struct.pack("<4H", 0x3F80, 0x4000, 0xBF80, 0x0000)
    f32 = struct.pack("<2f", 1.5, -2.0)
    seeds = {
        "safetensors_header": {
            "two_tensors": safetensors([("a", "BF16", [2, 2], bf16), ("b", "F32", [2], f32)]),
            "odd_offset": safetensors([("a", "BF16", [4], bf16)], pad_to=1),
            "quantized": safetensors([("w", "U8", [2, 2], b"\x01\x02\x03\x04"),
                                      ("s", "F8_E4M3", [2], b"\x38\x40")]),
            "metadata": safetensors([("x", "F16", [1], b"\x00\x3c")])[:8] + b"",
        },
        "http_request": {
            "completion": (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                           b"application/json\r\nContent-Length: 29\r\n\r\n"
                           b'{"prompt":"hi","max_tokens":2}'[:29]),
            "chunked_chat": (b"POST /v1/chat/completions/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
                             b"chunked\r\n\r\n2f\r\n"
                             b'{"messages":[{"role":"user","content":"hi"}]}\r\n0\r\n\r\n'),
            "pipelined": (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        },
        "routing_file": {"two_tokens": routing_file()},
        "calibration": {
            "points": json.dumps({"format": "keel-calibration", "version": 1,
                                  "extrapolation": "clamp", "expert_fraction": 0.5,
                                  "points": [{"num_decode_tokens": 1, "num_prefill_tokens": 0,
                                              "kv_tokens": 16, "step_s": 0.01}]}).encode(),
            "steps": json.dumps({"steps": [
                {"id": i + 1, "num_decode_tokens": 1 + i % 2, "num_prefill_tokens": 0,
                 "kv_tokens_read": 10 + i, "duration_s": 0.01 + 0.001 * i, "gap_s": 0.0001}
                for i in range(4)]}).encode(),
        },
        "trace": {
            "jsonl": b'{"arrival_s": 0.0, "prompt_len": 4, "output_len": 2}\n'
                     b'{"arrival_s": 0.5, "prompt_len": 8, "output_len": 1}\n',
            "bench_result": json.dumps({"start_times": [0.0, 0.1], "input_lens": [3, 4],
                                        "output_lens": [2, 2]}).encode(),
            "dataset": b'{"prompt": "hello", "output_len": 4}\n{"prompt": [1, 2, 3]}\n',
        },
    }
    for i, text in enumerate(raw_strings("tests/test_quant_config.cpp", r"quant_method|quant_algo")):
        seeds.setdefault("quant_config", {})["test_%02d" % i] = text.encode()
    seeds["request_json"] = {name: json.dumps(body).encode() for name, body in {
        "completion": {"model": "m", "prompt": "hi", "max_tokens": 4, "temperature": 0.5,
                       "top_p": 0.9, "top_k": 8, "seed": 3, "stop": ["x"], "stream": True,
                       "stream_options": {"include_usage": True}, "logprobs": 2, "n": 2},
        "token_batch": {"prompt": [[1, 2], [3]], "echo": True, "prompt_logprobs": 1,
                        "logit_bias": {"5": -100}, "min_tokens": 1, "stop_token_ids": [7],
                        "presence_penalty": 0.5, "frequency_penalty": -0.5,
                        "repetition_penalty": 1.1, "min_p": 0.05},
        "chat": {"messages": [{"role": "system", "content": "s"},
                              {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                 "max_completion_tokens": 8, "logprobs": True, "top_logprobs": 2,
                 "response_format": {"type": "text"}, "user": "u"},
    }.items()}
    for path in sorted(glob.glob(os.path.join(ROOT, "tests/fixtures/chat_templates/*.json"))):
        config = json.load(open(path)).get("tokenizer_config")
        if config is not None:
            name = os.path.splitext(os.path.basename(path))[0]
            seeds.setdefault("tokenizer_config", {})[name] = json.dumps(config).encode()
    return seeds


def write_target(target, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    committed = os.path.join(CORPUS, target)
    for path in glob.glob(os.path.join(committed, "*")):
        shutil.copy(path, out_dir)
    for pattern in FILE_SEEDS[target]:
        for path in glob.glob(os.path.join(ROOT, pattern)):
            digest = hashlib.sha1(open(path, "rb").read()).hexdigest()[:12]
            shutil.copy(path, os.path.join(out_dir, "file-" + digest))
    for name, data in generated().get(target, {}).items():
        open(os.path.join(out_dir, "seed-" + name), "wb").write(data)


def main():
    if sys.argv[1:] == ["--commit"]:
        seeds = generated()
        for target, patterns in FILE_SEEDS.items():
            # Up to three of the repository's small files, so the default suite replays each
            # target on real inputs too (scripts/fuzz seeds campaigns with all of them).
            paths = sorted(p for pattern in patterns for p in glob.glob(os.path.join(ROOT, pattern))
                           if os.path.getsize(p) < 32 * 1024)
            for path in paths[:3]:
                name = os.path.relpath(path, ROOT).replace("/", "_")
                seeds.setdefault(target, {})["file-" + name] = \
                    open(path, "rb").read()
        for target, files in seeds.items():
            os.makedirs(os.path.join(CORPUS, target), exist_ok=True)
            for name, data in files.items():
                open(os.path.join(CORPUS, target, "seed-" + name), "wb").write(data)
        return
    if len(sys.argv) != 3 or sys.argv[1] not in FILE_SEEDS:
        sys.exit(__doc__ + "\ntargets: " + " ".join(FILE_SEEDS))
    write_target(sys.argv[1], sys.argv[2])


if __name__ == "__main__":
    main()
