#!/usr/bin/python3
"""Checks deploy/ against the binaries it runs, then rehearses the cpu-demo overlay locally.

Static checks (both overlays, as `kubectl kustomize` renders them): every flag a container
passes is one its command accepts, every $(VAR) is defined, probes name our ports and health
services, workers register through a Service that selects the front-end and publishes it before
it is ready, drains fit in the grace period, volumes and the model path line up, the gpu overlay
asks for GPUs; the image's runtime packages (deploy/docker/packages.sh) provide every shared
library the binaries load.

Rehearsal: each pod of the cpu-demo render becomes local processes on its own loopback address
(127.0.0.1x: pods have their own network namespaces, so `--host=0.0.0.0` becomes the pod's
address), with its emptyDir as a temporary directory, Service names resolved to the pods they
select (a headless one to all of them, as a list), the downward-API variables filled in, init
containers run first. Then: the probes turn SERVING, the load-test Job's pdbench passes, every
front-end serves, a stopped front-end leaves the others serving, and a SIGTERM'd decode worker
finishes the request it streams, turns not ready, and exits 0, as the front-ends and prefill
worker do.

usage: deploy_test.py PDSERVE PDBENCH REPO_ROOT WORK_DIR
Exit 77 (skipped) without kubectl or python3-yaml.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

SKIP = 77


def render(deploy, overlay):
    out = subprocess.run(["kubectl", "kustomize", os.path.join(deploy, "k8s", "overlays", overlay)],
                         check=True, capture_output=True, text=True).stdout
    import yaml
    return [d for d in yaml.safe_load_all(out) if d]


def flags_of(binary, sub):
    cmd = [binary] + ([sub] if sub else []) + ["--help"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    text = run.stdout + run.stderr
    return set(re.findall(r"^\s+--([a-z0-9-]+)", text, re.M))


def pod_specs(docs):
    """(workload name, pod template spec, labels, replicas, kind) of Deployments and Jobs."""
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            t = d["spec"]["template"]
            yield (d["metadata"]["name"], t["spec"], t["metadata"].get("labels", {}),
                   d["spec"].get("replicas", 1) if d["kind"] == "Deployment" else 1, d["kind"])


def flag_values(args):
    out = {}
    for a in args:
        m = re.match(r"--([a-z0-9-]+)(?:=(.*))?$", a)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def command_of(c):
    """(binary name, subcommand or None, flag args) of a pdserve-image container."""
    cmd = c.get("command") or ["/usr/local/bin/pdserve"]
    binary = os.path.basename(cmd[0])
    args = list(cmd[1:]) + list(c.get("args", []))
    if binary == "pdserve":
        return binary, args[0], args[1:]
    return binary, None, args


def check_static(docs, overlay, pdserve, pdbench, errors):
    def err(msg):
        errors.append(f"{overlay}: {msg}")

    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    spec_annotations = {d["metadata"]["name"]: d["spec"]["template"]["metadata"].get(
        "annotations", {}) for d in docs if d["kind"] in ("Deployment", "Job")}
    help_cache = {}
    frontend_pods = frontend_pods_of(docs)
    for name, spec, labels, replicas, kind in pod_specs(docs):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            sources = [k for k in v if k != "name"]
            if len(sources) != 1:
                err(f"{name}: volume {v['name']} has sources {sources}")
        containers = spec.get("initContainers", []) + spec["containers"]
        for c in containers:
            where = f"{name}/{c['name']}"
            binary, sub, args = command_of(c)
            if binary not in ("pdserve", "pdbench"):
                err(f"{where}: runs {binary}, not pdserve or pdbench")
                continue
            key = (binary, sub)
            if key not in help_cache:
                help_cache[key] = flags_of(pdserve if binary == "pdserve" else pdbench, sub)
            known = help_cache[key]
            if not known:
                err(f"{where}: `{binary} {sub or ''} --help` lists no flags")
            values = flag_values(args)
            for f in values:
                if f not in known:
                    err(f"{where}: {binary} {sub or ''} has no flag --{f}")
            env = {e["name"] for e in c.get("env", [])}
            for a in args:
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
                    if var not in env:
                        err(f"{where}: $({var}) in '{a}' is not in its env")
            mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    err(f"{where}: mounts undefined volume {m['name']}")
            model = values.get("model") or values.get("out")
            if model is not None:
                resolved = re.sub(r"\$\((\w+)\)", lambda m: next(
                    (e.get("value", "") for e in c.get("env", []) if e["name"] == m.group(1)), ""),
                    model)
                if not any(resolved.startswith(p.rstrip("/") + "/") for p in mounts):
                    err(f"{where}: model path {resolved} is under no mount {mounts}")
            ports = {p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                p = c.get(probe)
                if p is None:
                    continue
                g = p.get("grpc")
                if g is None:
                    err(f"{where}: {probe} is not a gRPC health probe")
                    continue
                if g["port"] not in ports:
                    err(f"{where}: {probe} port {g['port']} is not a container port {ports}")
                service = g.get("service", "")
                want = {"frontend": "pdserve.v1.Serving"}.get(sub, "pdserve.internal.Worker") \
                    if probe == "readinessProbe" else ""
                if service != want:
                    err(f"{where}: {probe} asks service '{service}', expected '{want}'")
            if sub in ("prefill", "decode"):
                d = next(d for d in docs if d["metadata"]["name"] == name)
                rolling = d["spec"].get("strategy", {}).get("rollingUpdate", {})
                if d["spec"].get("replicas", 1) < 2 and rolling.get("maxUnavailable") not in (
                        0, "0", "0%"):
                    err(f"{where}: one replica and maxUnavailable "
                        f"{rolling.get('maxUnavailable')}: a rollout leaves no {sub} worker")
            if binary == "pdserve" and sub in ("frontend", "prefill", "decode", "colocated"):
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe not in c:
                        err(f"{where}: no {probe}")
                drain = float(values.get("drain-timeout-s") or 30)
                pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
                pause = float(pre[-1]) if pre and pre[0].endswith("sleep") else 0
                grace = spec.get("terminationGracePeriodSeconds", 30)
                if drain + pause + 5 > grace:
                    err(f"{where}: drain {drain} s + preStop {pause} s leaves no margin in the "
                        f"grace period of {grace} s")
                if values.get("host") == "0.0.0.0" and sub != "frontend" and \
                        "advertise-host" not in values:
                    err(f"{where}: listens on 0.0.0.0 without --advertise-host")
                gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
                backend = next((e.get("value") for e in c.get("env", [])
                                if e["name"] == "PDS_BACKEND"), None)
                if sub != "frontend":
                    if overlay == "gpu" and (gpus != 1 or backend != "cuda"):
                        err(f"{where}: the gpu overlay's workers need one GPU and the cuda "
                            f"backend (have {gpus}, {backend})")
                    if overlay == "cpu-demo" and (gpus or backend != "cpu"):
                        err(f"{where}: the cpu-demo workers must not ask for GPUs ({gpus}, "
                            f"{backend})")
            if values.get("http-port") not in (None, "-1") and \
                    int(values["http-port"]) not in ports:
                err(f"{where}: --http-port={values['http-port']} is not a container port {ports}")
            if values.get("metrics-port") not in (None, "-1"):
                port = int(values["metrics-port"])
                if port not in ports:
                    err(f"{where}: --metrics-port={port} is not a container port {ports}")
                notes = spec_annotations.get(name, {})
                if notes.get("prometheus.io/port") != str(port):
                    err(f"{where}: prometheus.io/port {notes.get('prometheus.io/port')} is not "
                        f"the metrics port {port}")
            # Addresses of other components must be Services that reach the front-end.
            for flag, needs_unready in (("frontend", True), ("target", False)):
                addr = values.get(flag)
                if addr is None:
                    continue
                host, _, port = addr.rpartition(":")
                s = services.get(host)
                if s is None:
                    err(f"{where}: --{flag}={addr}: no Service {host}")
                    continue
                sel = s["spec"].get("selector", {})
                matching = [fp for fp in frontend_pods if
                            all(fp[0].get(k) == v for k, v in sel.items())]
                if not matching:
                    err(f"{where}: Service {host} selects no front-end pod")
                sp = [p for p in s["spec"]["ports"] if str(p["port"]) == port]
                if not sp:
                    err(f"{where}: Service {host} has no port {port}")
                elif matching:
                    target = sp[0].get("targetPort", sp[0]["port"])
                    cports = matching[0][1]
                    if target not in cports and target not in cports.values():
                        err(f"{where}: Service {host} port {port} targets {target}, not a "
                            f"front-end port {cports}")
                if needs_unready and not s["spec"].get("publishNotReadyAddresses"):
                    err(f"{where}: registers through {host}, which hides the front-end until it "
                        "is ready (it is ready only once workers registered)")
    if len(frontend_pods) != 1:
        err(f"expected one front-end Deployment, found {len(frontend_pods)}")


def frontend_pods_of(docs):
    out = []
    for name, spec, labels, replicas, kind in pod_specs(docs):
        for c in spec["containers"]:
            binary, sub, _ = command_of(c)
            if sub == "frontend":
                out.append((labels, {p.get("name"): p["containerPort"]
                                     for p in c.get("ports", [])}))
    return out


def check_packages(repo, binaries, errors):
    """Every library the binaries load comes from a runtime package of the image or its base."""
    if shutil.which("dpkg") is None or shutil.which("apt-cache") is None:
        print("not a Debian system: the image's package list is not checked")
        return
    script = os.path.join(repo, "deploy", "docker", "packages.sh")
    listed = {b: set(subprocess.run(["bash", script, "--list", "runtime", b], check=True,
                                    capture_output=True, text=True).stdout.split())
              for b in ("cpu", "cuda")}
    # What apt installs with them (their dependencies, e.g. OpenBLAS's libgfortran5).
    deps = subprocess.run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
                           "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances"] +
                          sorted(listed["cpu"]), capture_output=True, text=True).stdout
    closure = set(listed["cpu"]) | {
        line.strip().split(":", 1)[-1].strip().strip("<>").split(":")[0]
        for line in deps.splitlines() if line.strip()}
    base = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libzstd1", "liblzma5", "libbz2-1.0"}
    cuda_libs = {"libcublas": "libcublas-", "libcublasLt": "libcublas-", "libcudart": "cuda-cudart-",
                 "libnccl": "libnccl2"}
    for binary in binaries:
        out = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.match(r"\s*(\S+) => (/\S+)", line)
            if not m:
                continue
            soname, path = m.groups()
            stem = soname.split(".so")[0]
            if stem in cuda_libs:
                if not any(p.startswith(cuda_libs[stem]) for p in listed["cuda"]):
                    errors.append(f"{soname}: no {cuda_libs[stem]}* in the cuda runtime packages")
                continue
            owner = subprocess.run(["dpkg", "-S", os.path.realpath(path)], capture_output=True,
                                   text=True)
            if owner.returncode != 0:
                owner = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True)
            if owner.returncode != 0:
                errors.append(f"{soname} ({path}) belongs to no Debian package")
                continue
            pkgs = {p.strip().split(":")[0] for p in owner.stdout.split(":", 1)[0].split(",")}
            if not pkgs & (closure | base):
                errors.append(f"{soname} comes from {sorted(pkgs)}, not a runtime package of "
                              "deploy/docker/packages.sh")


class Pod:
    """One pod of the render, run as local processes."""

    def __init__(self, name, spec, ip, work, services, log_dir):
        self.name, self.spec, self.ip = name, spec, ip
        self.dirs = {v["name"]: os.path.join(work, name, v["name"]) for v in spec.get("volumes", [])}
        for d in self.dirs.values():
            os.makedirs(d, exist_ok=True)
        self.services = services
        self.log_dir = log_dir
        self.procs = []

    def argv(self, c, binaries):
        env = {"POD_IP": self.ip, "POD_NAME": self.name}
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
            else:
                path = e["valueFrom"]["fieldRef"]["fieldPath"]
                env[e["name"]] = {"status.podIP": self.ip, "metadata.name": self.name}[path]
        binary, sub, args = command_of(c)
        out = [binaries[binary]] + ([sub] if sub else [])
        mounts = {m["mountPath"]: self.dirs[m["name"]] for m in c.get("volumeMounts", [])}
        for a in args:
            a = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a)
            if a == "--host=0.0.0.0":
                a = f"--host={self.ip}"  # the pod's own network namespace
            m = re.match(r"(--(?:frontend|target))=([^:]+):(\d+)$", a)
            if m:
                a = m.group(1) + "=" + ",".join(
                    f"{ip}:{m.group(3)}" for ip in self.services[m.group(2)])
            for path, local in mounts.items():
                a = a.replace("=" + path.rstrip("/") + "/", "=" + local + "/")
            out.append(a)
        return out

    def run_init(self, binaries):
        for c in self.spec.get("initContainers", []):
            subprocess.run(self.argv(c, binaries), check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=300)

    def start(self, binaries):
        for c in self.spec["containers"]:
            log = open(os.path.join(self.log_dir, f"{self.name}-{c['name']}.log"), "w")
            self.procs.append(subprocess.Popen(self.argv(c, binaries), stdout=log,
                                               stderr=subprocess.STDOUT))

    def stop(self, timeout):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                codes.append("killed")
        return codes


def probe(health_pb2, health_stub, service, timeout=2):
    try:
        return health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                 timeout=timeout).status == health_pb2.HealthCheckResponse.SERVING
    except Exception:  # not up yet
        return False


def rehearse(docs, repo, pdserve, pdbench, work):
    import grpc
    gen = os.path.join(work, "gen")
    os.makedirs(gen, exist_ok=True)
    here = os.path.join(repo, "tests", "server", "python")
    for root, name in [(os.path.join(repo, "proto"), "pdserve/v1/serving.proto"),
                       (here, "health.proto")]:
        subprocess.run(["protoc", f"--proto_path={root}", f"--python_out={gen}",
                        f"--grpc_python_out={gen}",
                        "--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin",
                        os.path.join(root, name)], check=True)
    sys.path.insert(0, gen)
    from pdserve.v1 import serving_pb2, serving_pb2_grpc
    import health_pb2
    import health_pb2_grpc

    binaries = {"pdserve": pdserve, "pdbench": pdbench}
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    deployments = [(n, s, l, r) for n, s, l, r, k in pod_specs(docs) if k == "Deployment"]
    jobs = [(n, s) for n, s, l, r, k in pod_specs(docs) if k == "Job"]
    # Pod addresses; Services resolve to the pods they select (here: the front-end).
    # Addresses of this run alone (127.N.0.x): runs from two build trees never meet.
    net = 20 + os.getpid() % 200
    pods, ip = [], 10
    for name, spec, labels, replicas in deployments:
        for i in range(replicas):
            pods.append((f"{name}-{i}", spec, labels, f"127.{net}.0.{ip}"))
            ip += 1
    # A headless Service (clusterIP None) names every pod it selects (as DNS would: a list of
    # addresses); another one, one pod (as its virtual IP would route a connection).
    services = {}
    for d in docs:
        if d["kind"] == "Service":
            sel = d["spec"]["selector"]
            hit = [p for p in pods if all(p[2].get(k) == v for k, v in sel.items())]
            assert hit, f"Service {d['metadata']['name']} selects no pod"
            headless = d["spec"].get("clusterIP") == "None"
            services[d["metadata"]["name"]] = [p[3] for p in hit] if headless else [hit[0][3]]
    running = {}
    try:
        for name, spec, labels, addr in pods:
            pod = Pod(name, spec, addr, os.path.join(work, "volumes"), services, logs)
            pod.run_init(binaries)
            running[name] = pod
        for pod in running.values():
            pod.start(binaries)
        channels = {}
        for name, pod in running.items():
            c = pod.spec["containers"][0]
            ready = c["readinessProbe"]["grpc"]
            channels[name] = (grpc.insecure_channel(f"{pod.ip}:{ready['port']}"),
                              ready.get("service", ""))
        deadline = time.time() + 180
        for name, (ch, service) in channels.items():
            stub = health_pb2_grpc.HealthStub(ch)
            while not (probe(health_pb2, stub, service) and probe(health_pb2, stub, "")):
                for pod in running.values():
                    for p in pod.procs:
                        assert p.poll() is None, f"{pod.name} exited with {p.returncode}; see {logs}"
                assert time.time() < deadline, f"{name} not ready ({service}) in 180 s; see {logs}"
                time.sleep(0.2)
        print(f"rehearsal: {len(running)} pods ready")

        # The load-test Job, as written.
        for name, spec in jobs:
            pod = Pod(name, spec, f"127.{net}.0.99", os.path.join(work, "volumes"), services,
                      logs)
            argv = pod.argv(spec["containers"][0], binaries)
            result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            open(os.path.join(logs, f"{name}.log"), "w").write(result.stdout + result.stderr)
            assert result.returncode == 0, f"{name}: exit {result.returncode}\n{result.stderr}"
            assert re.search(r"Successful requests:\s+60\b", result.stdout), result.stdout
            print(f"rehearsal: job {name} passed")

        # The front-end's Prometheus endpoint, where the annotations say.
        fe_name, fe_spec, _, fe_ip = next(p for p in pods if p[2].get(
            "app.kubernetes.io/component") == "frontend")
        notes = next(d for d in docs if d["metadata"]["name"] == fe_name.rsplit("-", 1)[0]
                     )["spec"]["template"]["metadata"]["annotations"]
        url = f"http://{fe_ip}:{notes['prometheus.io/port']}{notes['prometheus.io/path']}"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        ok = re.search(r'^pdserve_requests_total\{code="OK"\} (\d+)', text, re.M)
        assert ok and int(ok.group(1)) >= 60, f"{url}: {text[:2000]}"
        assert re.search(r"^pdserve_ttft_seconds_count \d+", text, re.M), text[:2000]
        print(f"rehearsal: {url} counts {ok.group(1)} finished requests")

        # Rolling a decode pod: SIGTERM while it streams a request.
        frontend = [n for n, s, l, a in pods if l.get("app.kubernetes.io/component") == "frontend"]
        decode = [n for n, s, l, a in pods if l.get("app.kubernetes.io/component") == "decode"]
        prefill = [n for n, s, l, a in pods if l.get("app.kubernetes.io/component") == "prefill"]
        assert frontend and decode and prefill
        # Every front-end serves (the workers registered with each): a request through each.
        for name in frontend:
            replies = list(serving_pb2_grpc.ServingStub(channels[name][0]).Generate(
                serving_pb2.GenerateRequest(prompt_token_ids=list(range(5, 21)), max_tokens=4,
                                            ignore_eos=True), timeout=60))
            assert sum(len(m.token_ids) for m in replies) == 4, f"{name}: {replies}"
        print(f"rehearsal: each of {len(frontend)} front-ends serves")
        # Rolling a front-end: the others go on serving.
        if len(frontend) > 1:
            codes = running[frontend[0]].stop(timeout=60)
            assert codes == [0], f"{frontend[0]} exited with {codes}"
            frontend = frontend[1:]
            replies = list(serving_pb2_grpc.ServingStub(channels[frontend[0]][0]).Generate(
                serving_pb2.GenerateRequest(prompt_token_ids=list(range(5, 21)), max_tokens=4,
                                            ignore_eos=True), timeout=60))
            assert sum(len(m.token_ids) for m in replies) == 4, f"{frontend[0]}: {replies}"
            print(f"rehearsal: with one front-end stopped, {frontend[0]} serves")
        api = serving_pb2_grpc.ServingStub(channels[frontend[0]][0])
        # Long enough (seconds) that the draining worker's heartbeat runs during the drain.
        TOKENS = 400
        call = api.Generate(serving_pb2.GenerateRequest(
            prompt_token_ids=list(range(5, 37)), max_tokens=TOKENS, ignore_eos=True), timeout=120)
        got = [0]
        first = threading.Event()
        failure = []

        def read():
            try:
                for m in call:
                    got[0] += len(m.token_ids)
                    first.set()
            except grpc.RpcError as e:
                failure.append(e)
            first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(60), "no first token"
        victim = running[decode[0]]
        ready_stub = health_pb2_grpc.HealthStub(channels[decode[0]][0])
        # Every readiness change the worker publishes, from now until it exits.
        watched = []
        watching = threading.Event()

        def watch():
            try:
                for r in ready_stub.Watch(health_pb2.HealthCheckRequest(
                        service="pdserve.internal.Worker"), timeout=120):
                    watched.append(r.status)
                    watching.set()
            except grpc.RpcError:
                pass
            watching.set()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert watching.wait(10) and watched == [health_pb2.HealthCheckResponse.SERVING], watched
        at_signal = got[0]
        for p in victim.procs:
            p.send_signal(signal.SIGTERM)
        fe_stub = health_pb2_grpc.HealthStub(channels[frontend[0]][0])
        until = time.time() + 10
        while probe(health_pb2, ready_stub, "pdserve.internal.Worker") and time.time() < until:
            time.sleep(0.05)
        assert time.time() < until, "a draining worker still reported ready"
        reader.join(120)
        assert not failure, f"the streamed request failed during the drain: {failure[0]}"
        assert got[0] == TOKENS, f"{got[0]} of {TOKENS} tokens"
        assert at_signal < TOKENS, "the request had ended before the signal: no drain was tested"
        codes = [p.wait(timeout=60) for p in victim.procs]  # on its own: drained
        assert codes == [0], f"the drained decode worker exited with {codes}"
        watcher.join(10)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert serving not in watched[watched.index(serving) + 1:], \
            f"readiness came back during the drain: {watched}"
        if len(decode) == 1:
            until = time.time() + 10
            while probe(health_pb2, fe_stub, "pdserve.v1.Serving") and time.time() < until:
                time.sleep(0.05)
            assert time.time() < until, "front-end ready without a decode worker"
        for name in frontend + prefill:
            codes = running[name].stop(timeout=60)
            assert codes == [0], f"{name} exited with {codes}"
        print("rehearsal: drained decode worker finished its request; every pod exited 0")
    finally:
        for pod in running.values():
            pod.stop(timeout=5)


def main():
    pdserve, pdbench, repo, work = sys.argv[1:5]
    if shutil.which("kubectl") is None:
        print("kubectl not found (Debian: kubernetes-client): skipped")
        return SKIP
    try:
        import yaml  # noqa: F401
        import grpc  # noqa: F401
    except ImportError as e:
        print(f"{e.name} not found (Debian: python3-yaml, python3-grpcio): skipped")
        return SKIP
    if not os.path.exists("/usr/bin/grpc_python_plugin"):
        print("grpc_python_plugin not found (Debian: protobuf-compiler-grpc): skipped")
        return SKIP
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    deploy = os.path.join(repo, "deploy")
    errors = []
    renders = {o: render(deploy, o) for o in ("cpu-demo", "gpu")}
    for overlay, docs in renders.items():
        check_static(docs, overlay, pdserve, pdbench, errors)
    check_packages(repo, [pdserve, pdbench], errors)
    if errors:
        print("deploy/ is inconsistent:\n  " + "\n  ".join(errors))
        return 1
    print("static checks: OK")
    try:
        rehearse(renders["cpu-demo"], repo, pdserve, pdbench, work)
    except BaseException:
        # What each process said last: ctest keeps only this output.
        logs = os.path.join(work, "logs")
        for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
            with open(os.path.join(logs, name), errors="replace") as f:
                tail = f.readlines()[-15:]
            print(f"--- {name} (last {len(tail)} lines)\n" + "".join(tail), end="")
        raise
    print("deploy test: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
