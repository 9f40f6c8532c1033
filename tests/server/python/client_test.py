#!/usr/bin/python3
"""Drives a local pdserve cluster through a client that shares no code with ours: Debian's
python3-grpcio with stubs generated from proto/ at test time.

usage: client_test.py PDSERVE_BINARY PROTO_DIR WORK_DIR
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


def main():
    pdserve, proto_dir, work = sys.argv[1], sys.argv[2], sys.argv[3]
    here = os.path.dirname(os.path.abspath(__file__))
    os.makedirs(work, exist_ok=True)
    gen = os.path.join(work, "gen")
    os.makedirs(gen, exist_ok=True)
    plugin = "/usr/bin/grpc_python_plugin"
    for root, name in [(proto_dir, "pdserve/v1/serving.proto"), (here, "health.proto"),
                       (here, "reflection.proto")]:
        subprocess.run(["protoc", f"--proto_path={root}", f"--python_out={gen}",
                        f"--grpc_python_out={gen}", f"--plugin=protoc-gen-grpc_python={plugin}",
                        os.path.join(root, name)], check=True)
    sys.path.insert(0, gen)
    import grpc
    from pdserve.v1 import serving_pb2, serving_pb2_grpc
    import health_pb2, health_pb2_grpc, reflection_pb2, reflection_pb2_grpc

    model = os.path.join(work, "tiny")
    if not os.path.exists(os.path.join(model, "config.json")):
        subprocess.run([pdserve, "make-model", "--preset", "tiny", "--out", model, "--seed", "3"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ready = os.path.join(work, "ready")
    if os.path.exists(ready):
        os.remove(ready)
    log = open(os.path.join(work, "cluster.log"), "w")
    # Its own session: the ^C at the end goes to its process group, as a terminal's would.
    up2 = None
    with socket.socket() as s:  # a free port for the OpenAI-compatible HTTP API
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    up = subprocess.Popen([pdserve, "up", "--model", model, "--prefill", "1", "--decode", "1",
                           "--port", "0", "--threads", "1", "--ready-file", ready,
                           "--drain-timeout-s", "60", "--http-port", str(http_port)],
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not os.path.exists(ready):
            assert up.poll() is None, "pdserve up exited early; see cluster.log"
            assert time.time() < deadline, "cluster not ready in 120 s"
            time.sleep(0.1)
        address = open(ready).read().strip()
        channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(channel).result(timeout=30)

        # Standard health service.
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, reply

        # Server reflection lists the public service.
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        names = [s.name for s in responses[0].list_services_response.service]
        assert "pdserve.v1.Serving" in names, names

        stub = serving_pb2_grpc.ServingStub(channel)
        # A streamed greedy request by token ids.
        req = serving_pb2.GenerateRequest(prompt_token_ids=[5, 9, 200, 31], max_tokens=12,
                                          ignore_eos=True, request_id="py-1")
        msgs = list(stub.Generate(req, timeout=60))
        tokens = [t for m in msgs for t in m.token_ids]
        assert len(tokens) == 12, tokens
        assert len(msgs) >= 2, "tokens must stream in several messages"
        done = msgs[-1].done
        assert done.finish_reason == "length", done
        assert done.completion_tokens == 12 and done.prompt_tokens == 4, done
        tl = done.timeline
        assert tl.prefill_instance == "prefill-0" and tl.decode_instance == "decode-0", tl
        order = [tl.arrival_us, tl.queued_us, tl.prefill_start_us, tl.prefill_end_us,
                 tl.first_token_us, tl.finish_us]
        assert all(t > 0 for t in order) and order == sorted(order), tl
        # The KV leaves layer by layer from the start of the prefill step.
        assert tl.prefill_start_us <= tl.kv_transfer_start_us <= tl.kv_transfer_end_us, tl
        assert tl.prefill_end_us <= tl.kv_transfer_end_us, tl
        assert tl.kv_transfer_end_us <= tl.decode_start_us <= tl.finish_us, tl
        # The same request again gives the same tokens (greedy).
        again = [t for m in stub.Generate(req, timeout=60) for t in m.token_ids]
        assert again == tokens, (again, tokens)

        # Text in, text out.
        msgs = list(stub.Generate(serving_pb2.GenerateRequest(
            prompt_text="hello world", max_tokens=6, ignore_eos=True), timeout=60))
        assert sum(len(m.token_ids) for m in msgs) == 6
        assert msgs[-1].done.prompt_tokens > 0

        # The OpenAI-compatible HTTP API, read with urllib: the same text, whole and streamed
        # as server-sent events, and errors as OpenAI error objects.
        grpc_text = "".join(m.text for m in msgs)
        http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def post(body):
            return http.open(urllib.request.Request(
                f"http://127.0.0.1:{http_port}/v1/completions", data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"}), timeout=60)
        body = {"model": "tiny", "prompt": "hello world", "max_tokens": 6, "temperature": 0,
                "ignore_eos": True}
        with post(body) as r:
            out = json.load(r)
        assert out["choices"][0]["text"] == grpc_text, (out, grpc_text)
        assert out["choices"][0]["finish_reason"] == "length", out
        assert out["usage"]["completion_tokens"] == 6, out
        with post(dict(body, stream=True)) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream"), r.headers
            events = [line[len("data: "):] for line in r.read().decode().split("\n")
                      if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == grpc_text
        try:
            post({"prompt": "x", "max_tokens": 0})
            raise AssertionError("max_tokens 0 accepted over HTTP")
        except urllib.error.HTTPError as e:
            assert e.code == 400, e.code
            assert "max_tokens" in json.load(e)["error"]["message"]

        # Bad input: INVALID_ARGUMENT with a message.
        for bad in [serving_pb2.GenerateRequest(max_tokens=4),
                    serving_pb2.GenerateRequest(prompt_token_ids=[1], prompt_text="x",
                                                max_tokens=4),
                    serving_pb2.GenerateRequest(prompt_token_ids=[1], max_tokens=0),
                    serving_pb2.GenerateRequest(prompt_token_ids=[10 ** 6], max_tokens=4),
                    serving_pb2.GenerateRequest(prompt_token_ids=[1], max_tokens=4,
                                                temperature=-1.0),
                    serving_pb2.GenerateRequest(prompt_token_ids=[1], max_tokens=4, top_p=0.0)]:
            try:
                list(stub.Generate(bad, timeout=30))
                raise AssertionError(f"accepted: {bad}")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), bad)
                assert e.details(), "error without a message"

        # Cancelling mid-stream frees everything.
        call = stub.Generate(serving_pb2.GenerateRequest(
            prompt_token_ids=list(range(10, 60)), max_tokens=200, ignore_eos=True), timeout=60)
        next(call)
        call.cancel()
        start = time.time()
        deadline = start + 20
        while True:
            status = stub.GetClusterStatus(serving_pb2.ClusterStatusRequest(), timeout=10)
            used = sum(i.kv_blocks_used for i in status.instances)
            # Only figures the front-end polled after the cancel count (polls every 200 ms).
            elapsed_ms = (time.time() - start) * 1000
            fresh = all(0 <= i.last_seen_ms_ago < elapsed_ms - 100 for i in status.instances)
            if fresh and used == 0 and status.requests_in_flight == 0:
                break
            assert time.time() < deadline, f"blocks still used after cancel: {status}"
            time.sleep(0.1)
        roles = sorted(i.role for i in status.instances)
        assert roles == ["decode", "prefill"], roles
        assert all(i.healthy for i in status.instances), status
        # ^C (SIGINT to the whole process group) while a request streams: `up` stops its
        # processes with one SIGTERM each, and each drains: the request gets every token.
        call = stub.Generate(serving_pb2.GenerateRequest(
            prompt_token_ids=list(range(10, 40)), max_tokens=120, ignore_eos=True), timeout=120)
        first = next(call)
        os.killpg(up.pid, signal.SIGINT)
        rest = [t for m in call for t in m.token_ids]
        assert len(first.token_ids) + len(rest) == 120, len(first.token_ids) + len(rest)
        assert up.wait(timeout=60) == 0

        # A second ^C stops at once, without waiting for the drains.
        try:
            os.remove(ready)
        except FileNotFoundError:
            pass
        up2 = subprocess.Popen([pdserve, "up", "--model", model, "--colocated", "1", "--port",
                                "0", "--threads", "1", "--max-batch-size", "1", "--ready-file",
                                ready, "--drain-timeout-s", "120"],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while not os.path.exists(ready):
            assert up2.poll() is None and time.time() < deadline, "second cluster not ready"
            time.sleep(0.1)
        stub2 = serving_pb2_grpc.ServingStub(grpc.insecure_channel(open(ready).read().strip()))
        # Work for far longer than the test waits: requests one at a time, 2000 tokens each.
        def long_request(i):
            return stub2.Generate(serving_pb2.GenerateRequest(
                prompt_token_ids=[5, 6, 7 + i], max_tokens=2000, ignore_eos=True), timeout=120)
        calls = [long_request(0)]
        next(calls[0])
        calls += [long_request(i) for i in range(1, 40)]
        deadline = time.time() + 30
        while stub2.GetClusterStatus(serving_pb2.ClusterStatusRequest(),
                                     timeout=10).requests_in_flight < 40:
            assert time.time() < deadline, "the 40 requests did not all arrive"
            time.sleep(0.02)
        # The two signals back to back: the second must not merge with the SIGTERM `up` sends.
        start = time.time()
        os.killpg(up2.pid, signal.SIGINT)
        os.killpg(up2.pid, signal.SIGTERM)
        code2 = up2.wait(timeout=30)
        assert time.time() - start < 5, f"a second ^C took {time.time() - start:.1f} s"
        assert code2 == 0, code2
        cut = 0
        for c in calls:
            try:
                for _ in c:
                    pass
            except grpc.RpcError:
                cut += 1
        assert cut > 0, "every request ended normally: the drain was not cut short"
        print("python client test: OK")
    finally:
        if up2 is not None and up2.poll() is None:
            os.killpg(up2.pid, signal.SIGKILL)  # its children follow (PR_SET_PDEATHSIG)
            up2.wait()
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
        try:
            code = up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
        log.close()
    assert code == 0, f"pdserve up exited with {code}"


if __name__ == "__main__":
    main()
