"""The resumable runner: a crash loses nothing and changes nothing; flaky APIs lose no item."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

from utils import judges, pipeline
from utils.pipeline import Config, Pipeline

ROLES = ["bard", "ghost", "analyst"]


def _config(tmp_path, name, **kw):
    base = dict(model="tiny-gemma2", roles=ROLES, n_questions=3, n_prompts=2, layers=[2, 4], max_tokens=6,
                min_count=1, min_score=0, chunk_size=4, workers=4, cache_dir=tmp_path / name / "cache",
                out_dir=tmp_path / name / "out")
    base.update(kw)
    return Config(**base)


def _vectors(cfg):
    out = cfg.out_dir / "tiny-gemma2"
    return {**load_file(str(out / "role_vectors.safetensors")), **load_file(str(out / "axis.safetensors")),
            **load_file(str(out / "default_vector.safetensors"))}


def test_killed_run_resumes_to_identical_vectors(tmp_path, tiny, monkeypatch):
    model, tok = tiny
    reference = Pipeline(_config(tmp_path, "uninterrupted"), model, tok, progress=False).run()
    assert reference["generation_failures"] == 0 and reference["items"] == (3 * 2 + 2) * 3

    calls = {"n": 0}
    real = pipeline.generate

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "generate", crashing)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(_config(tmp_path, "resumed"), model, tok, progress=False).run()
    done_before = len(Pipeline(_config(tmp_path, "resumed"), model, tok, progress=False).responses.records)
    assert done_before == 2 * 4  # two whole chunks were saved before the "kill"

    calls["n"] = -100  # no more crashes
    resumed = Pipeline(_config(tmp_path, "resumed"), model, tok, progress=False)
    summary = resumed.run()
    assert calls["n"] == -100 + 6 - 2  # only the 4 unfinished chunks of 6 were generated again
    assert summary["responses"] == reference["responses"]
    a, b = _vectors(_config(tmp_path, "uninterrupted")), _vectors(_config(tmp_path, "resumed"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == (2, 64)  # [n_layers, d_model]
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)

    # A third run finds everything done and redoes nothing.
    calls["n"] = 0
    again = Pipeline(_config(tmp_path, "resumed"), model, tok, progress=False)
    again.run()
    assert calls["n"] == 0


class FlakyOpenAI(BaseHTTPRequestHandler):
    """A loopback OpenAI-compatible server that fails in every way a real one does.

    The first attempt for each prompt fails according to the prompt's index: 429, 500, a reply slower than
    the client's timeout, or a malformed body. Prompts mentioning "law" (question 0) fail every time
    while ``broken`` is set, so they become permanent failures until the server is healed.
    """

    attempts: dict = {}
    broken = True
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with self.lock:
            n = self.attempts[prompt] = self.attempts.get(prompt, 0) + 1
        mode = sum(map(ord, prompt)) % 5 if n == 1 else "ok"
        if self.broken and "law" in prompt.lower() and "[ANSWER START]" not in prompt:
            mode = 1
        if mode == 0:
            return self._send(429, {"error": {"message": "rate limited"}})
        if mode == 1:
            return self._send(500, {"error": {"message": "internal error"}})
        if mode == 2:
            threading.Event().wait(1.5)  # longer than the client's 1 s timeout
        if mode == 3:
            return self._send(200, "this is not json", raw=True)
        judging = "[ANSWER START]" in prompt
        content = "3" if judging else f"Reply to: {prompt[-40:]}"
        self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]})

    def _send(self, status, payload, raw=False):
        data = payload.encode() if raw else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_flaky_api_loses_nothing_and_resumes(tmp_path, tiny, monkeypatch):
    from openai import OpenAI

    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(judges, "RETRY_BASE_DELAY", 0.01)
        monkeypatch.setattr(judges, "RETRY_ATTEMPTS", 3)
        client = OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="test-key", timeout=1.0,
                        max_retries=0)
        model, tok = tiny
        cfg = _config(tmp_path, "api", backend="api", judge="api", generation_model="fake/model", workers=8)
        first = Pipeline(cfg, model, tok, generation_client=client, judge_client=client, progress=False).run()
        per_question_0 = (len(ROLES) + 1) * 2  # every persona and prompt asks question 0 ("law")
        assert first["generation_failures"] == per_question_0
        assert first["responses"] + first["generation_failures"] == first["items"]
        assert all("InternalServerError" in e and "after 3 attempt" in e for e in first["failures"].values())
        assert first["judge_failures"] == 0 and first["judged"] == first["responses"] - 2 * 2  # defaults unjudged
        stored = Pipeline(cfg, model, tok, progress=False).responses.records.values()
        assert not any(r.get("response", "x") == "" for r in stored)  # failures are never empty strings
        assert "test-key" not in (cfg.cache_dir / "tiny-gemma2" / "responses.jsonl").read_text()

        FlakyOpenAI.broken = False
        second = Pipeline(cfg, model, tok, generation_client=client, judge_client=client, progress=False).run()
        assert second["generation_failures"] == 0 and second["judge_failures"] == 0
        assert second["responses"] == second["items"]
    finally:
        FlakyOpenAI.broken = True
        server.shutdown()
        server.server_close()


def test_gpu_measurement_script_runs_on_a_cpu_at_tiny_shape(capsys):
    from benchmarks import gpu_extraction

    assert gpu_extraction.main(["--shape", "tiny", "--n", "8", "--response-tokens", "40", "--layer", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens_per_s"] > 0 and result["blocks_built"] == 4 and result["layer"] == 3
    assert result["projected_hours_for_paper_scale"] > 0
