#!/usr/bin/env python3
"""keel serve driven by the official openai Python client, as a vLLM user drives vLLM.

Starts `keel serve MODEL_DIR --tp 2 --served-model-name a b --api-key KEY` (no config file) on
the synthetic tiny-chat model and checks, through openai.OpenAI: models.list/retrieve under
every served name and the path, 401 as openai.AuthenticationError for a wrong key, 404 as
NotFoundError for an unknown model, system_fingerprint on completions, chats and every stream
chunk (equal to what the server printed at start-up), x-request-id echoed and used as the
response id, seeded answers reproducible under one fingerprint; /tokenize, /detokenize and the
open probes over plain HTTP (urllib); request fields: n choices each reproducible,
stop_token_ids, logit_bias, echo, return_tokens_as_token_ids, chat logprob bytes, and the
refusals (unknown fields, response_format, tools on a template without them, tool_choice
required) as BadRequestError naming the field.

The openai package is a test dependency (scripts/setup installs it with pip); without it this
test fails, naming the package, rather than passing silently.

usage: test_openai_client.py --keel build/bin/keel --scratch DIR
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import unittest
import urllib.error
import urllib.request

try:
    import openai
except ImportError as missing:
    print(f"test_openai_client: the Python package '{missing.name}' is missing: "
          "pip install openai (scripts/setup installs it)", file=sys.stderr)
    sys.exit(1)

KEY = "sk-openai-client-test"
ARGS = None
SERVER = {}


def start_server():
    model = os.path.join(ARGS.scratch, "tiny-chat")
    shutil.rmtree(ARGS.scratch, ignore_errors=True)
    os.makedirs(ARGS.scratch)
    subprocess.run([ARGS.keel, "gen-model", "--preset", "tiny-chat", "--out", model],
                   check=True, stdout=subprocess.DEVNULL)
    process = subprocess.Popen(
        [ARGS.keel, "serve", model, "--tp", "2", "--port", "0", "--api-key", KEY,
         "--served-model-name", "a", "b"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    port = None
    deadline = time.time() + 120
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if found:
            port = int(found.group(1))
            break
    if port is None:
        process.kill()
        raise RuntimeError("keel serve did not start:\n" + "".join(lines))
    # Keep draining its output so a full pipe never stalls it.
    threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
    prefix = "keel serve: system_fingerprint "
    fingerprint = next(l[len(prefix):].strip() for l in lines if l.startswith(prefix))
    SERVER.update(process=process, port=port, model=model, fingerprint=fingerprint,
                  base=f"http://127.0.0.1:{port}")


def setUpModule():
    start_server()


def tearDownModule():
    process = SERVER.get("process")
    if process:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def raw(method, path, body=None, key=None):
    """(status, parsed JSON or text) of one plain HTTP request."""
    request = urllib.request.Request(
        SERVER["base"] + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json",
                 **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def client(key=KEY):
    return openai.OpenAI(base_url=SERVER["base"] + "/v1", api_key=key, max_retries=0,
                         timeout=60)


class OpenAIClient(unittest.TestCase):
    def test_models_under_every_name_and_the_path(self):
        ids = [model.id for model in client().models.list()]
        self.assertEqual(ids, ["a", "b", SERVER["model"]])
        self.assertEqual(client().models.retrieve("b").id, "b")
        with self.assertRaises(openai.NotFoundError):
            client().models.retrieve("c")
        for name in ["a", "b", SERVER["model"]]:
            answer = client().completions.create(model=name, prompt="The river", max_tokens=4,
                                                 temperature=0)
            self.assertEqual(answer.model, "a")
        with self.assertRaises(openai.NotFoundError):
            client().completions.create(model="c", prompt="x", max_tokens=1)

    def test_a_wrong_key_is_an_authentication_error(self):
        with self.assertRaises(openai.AuthenticationError) as caught:
            client("sk-wrong").completions.create(model="a", prompt="x", max_tokens=1)
        self.assertEqual(caught.exception.status_code, 401)
        self.assertEqual(caught.exception.code, "invalid_api_key")
        with self.assertRaises(openai.AuthenticationError):
            client("sk-wrong").models.list()
        for path in ["/v1/profile/start", "/v1/profile/stop"]:
            self.assertEqual(raw("POST", path, {})[0], 401, path)
        self.assertEqual(raw("GET", "/v1/telemetry/requests")[0], 401)
        for probe in ["/health", "/ping", "/version", "/metrics"]:
            self.assertEqual(raw("GET", probe)[0], 200, probe)

    def test_system_fingerprint_everywhere(self):
        fingerprint = SERVER["fingerprint"]
        self.assertTrue(fingerprint.startswith("keel1;rev="), fingerprint)
        self.assertIn(";det=batch_invariant;reduce=fixed_order;tp=2;", fingerprint)
        completion = client().completions.create(model="a", prompt="The river", max_tokens=4)
        self.assertEqual(completion.system_fingerprint, fingerprint)
        messages = [{"role": "user", "content": "hi"}]
        chat = client().chat.completions.create(model="b", messages=messages, max_tokens=5,
                                                temperature=0)
        self.assertEqual(chat.system_fingerprint, fingerprint)
        text = ""
        chunks = 0
        for chunk in client().chat.completions.create(model="b", messages=messages,
                                                      max_tokens=5, temperature=0, stream=True):
            self.assertEqual(chunk.system_fingerprint, fingerprint)
            chunks += 1
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        self.assertGreaterEqual(chunks, 2)
        self.assertEqual(text, chat.choices[0].message.content)
        # Same fingerprint, same seeded request: the same answer.
        answers = [client().chat.completions.create(model="a", messages=messages, max_tokens=8,
                                                    temperature=0.9, seed=5)
                   for _ in range(2)]
        self.assertEqual(answers[0].choices[0].message.content,
                         answers[1].choices[0].message.content)
        self.assertEqual(answers[0].system_fingerprint, answers[1].system_fingerprint)

    def test_request_id_is_echoed(self):
        raw = client().completions.with_raw_response.create(
            model="a", prompt="x", max_tokens=2, extra_headers={"x-request-id": "py-trace-1"})
        self.assertEqual(raw.headers["x-request-id"], "py-trace-1")
        self.assertEqual(raw.parse().id, "cmpl-py-trace-1")
        generated = client().completions.with_raw_response.create(model="a", prompt="x",
                                                                  max_tokens=2)
        self.assertEqual(generated.headers["x-request-id"], generated.parse().id)

    def test_tokenize_and_detokenize(self):
        text = "The river runs past the mill."
        status, tokens = raw("POST", "/tokenize", {"model": "a", "prompt": text}, KEY)
        self.assertEqual(status, 200, tokens)
        self.assertEqual(tokens["count"], len(tokens["tokens"]))
        self.assertIsNone(tokens["token_strs"])
        status, back = raw("POST", "/detokenize", {"model": "a", "tokens": tokens["tokens"]}, KEY)
        self.assertEqual((status, back), (200, {"prompt": text}))
        usage = client().completions.create(model="a", prompt=text, max_tokens=1).usage
        self.assertEqual(usage.prompt_tokens, tokens["count"])
        self.assertEqual(raw("POST", "/tokenize", {"model": "c", "prompt": "x"}, KEY)[0], 404)
        self.assertEqual(raw("POST", "/tokenize", {"model": "a", "prompt": "x"})[0], 401)


class RequestFields(unittest.TestCase):
    """Sampling and output fields through the client (vLLM's extensions via extra_body)."""

    def greedy_ids(self, prompt, max_tokens):
        answer = client().completions.create(
            model="a", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0,
            extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
        tokens = answer.choices[0].logprobs.tokens
        self.assertTrue(all(t.startswith("token_id:") for t in tokens), tokens)
        return [int(t[len("token_id:"):]) for t in tokens]

    def test_n_choices_are_each_reproducible(self):
        first = client().completions.create(model="a", prompt="The river", max_tokens=6,
                                            temperature=1.0, seed=11, n=3)
        again = client().completions.create(model="a", prompt="The river", max_tokens=6,
                                            temperature=1.0, seed=11, n=3)
        self.assertEqual([c.index for c in first.choices], [0, 1, 2])
        self.assertEqual([c.text for c in first.choices], [c.text for c in again.choices])
        # Each choice has a seed of its own (seed + index), not three copies of one.
        self.assertGreater(len({c.text for c in first.choices}), 1)
        self.assertEqual(first.usage.prompt_tokens, again.usage.prompt_tokens)

    def test_stop_token_ids_and_logit_bias(self):
        ids = self.greedy_ids("The river", 6)
        self.assertEqual(len(ids), 6)
        stop_at = ids[3]
        stopped = client().completions.create(
            model="a", prompt="The river", max_tokens=6, temperature=0,
            extra_body={"stop_token_ids": [stop_at], "ignore_eos": True})
        self.assertEqual(stopped.choices[0].finish_reason, "stop")
        self.assertLessEqual(stopped.usage.completion_tokens, 4)
        # +100 on one token makes greedy decoding choose it at every step.
        favoured = ids[0] if ids[0] != ids[1] else ids[2]
        biased = client().completions.create(
            model="a", prompt="The river", max_tokens=5, temperature=0, logprobs=0,
            logit_bias={str(favoured): 100},
            extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
        self.assertEqual(biased.choices[0].logprobs.tokens, [f"token_id:{favoured}"] * 5)

    def test_echo_and_chat_logprob_bytes(self):
        echoed = client().completions.create(model="a", prompt="The river", max_tokens=3,
                                             temperature=0, echo=True)
        self.assertTrue(echoed.choices[0].text.startswith("The river"), echoed.choices[0].text)
        chat = client().chat.completions.create(
            model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            temperature=0, logprobs=True, top_logprobs=2)
        entries = chat.choices[0].logprobs.content
        self.assertEqual(len(entries), chat.usage.completion_tokens)
        for entry in entries:
            self.assertEqual(bytes(entry.bytes).decode("utf-8", "replace"), entry.token)
            self.assertEqual(len(entry.top_logprobs), 2)

    def test_what_keel_does_not_do_is_a_bad_request_naming_it(self):
        cases = [
            ({"extra_body": {"no_such_field": 1}}, "no_such_field"),
            ({"response_format": {"type": "json_object"}}, "response_format"),
            ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
            ({"tool_choice": "required"}, "tool_choice"),
        ]
        for extra, field in cases:
            with self.subTest(field=field):
                with self.assertRaises(openai.BadRequestError) as caught:
                    client().chat.completions.create(
                        model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                        **extra)
                self.assertEqual(caught.exception.status_code, 400)
                self.assertIn(field, str(caught.exception))


def main():
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keel", required=True)
    parser.add_argument("--scratch", required=True)
    ARGS, rest = parser.parse_known_args()
    print(f"openai {openai.__version__}")
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
