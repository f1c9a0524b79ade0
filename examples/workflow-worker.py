"""An external Lodge workflow worker in Python: durable workflows written in another language.

Uses only stock grpcio, grpcio-reflection and protobuf (tests/reflection/requirements.txt):
every message is built from the node's server reflection at run time, so nothing is generated.

    python3 examples/workflow-worker.py --node 127.0.0.1:7000 --id py-1 --journal /tmp/journal

then, from anywhere:

    lodge workflow start py-pipeline --input '{"items": ["a", "b"]}'

The worker opens `lodge.workflow.v1.Workflow/Work`, says which types it serves, and takes
activations: a run's input and the steps recorded so far. Its code runs from the top each time;
`ctx.step(name, fn)` answers a recorded step's result without calling `fn` (replay), and for a
new step calls `fn`, records the result through the stream and waits until it is recorded
(through raft) before going on. If this process dies, the node gives the run to another worker
of the type (on this node or another), which replays the recorded steps and goes on from there:
a step recorded here is never run again.

Type `py-pipeline` version 1, input {"items": [...]}: steps `fetch` (the items), `transform`
(upper-cased), `publish` (appends one line per run to --journal, and answers the count). Every
step appends "<run> <step> <worker>" to --journal when it runs, so a reader can count runs.

It connects again (0.5 s, doubling to 5 s) when the node is unreachable or restarts, and exits
on any other error (a refused hello, a missing role).

--hold STEP:FILE makes the worker wait for FILE to exist before it runs STEP: a test uses it to
kill the worker at a known point. LODGE_TOKEN, when set, is sent as a bearer token (a worker needs
the `workflow-worker` role; unauthenticated callers are allowed on loopback only).
"""

import argparse
import json
import os
import queue
import sys
import threading
import time

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "lodge.workflow.v1.Workflow"


class Stopped(Exception):
    """The node took the run away (cancelled, moved, or a step was refused): stop quietly."""


class Failed(Exception):
    """Fails the run for good; any other exception is tried again from the record."""


class Ctx:
    """What a workflow's code sees: its run and the steps recorded before this activation."""

    def __init__(self, worker, run, recorded):
        self.worker = worker
        self.run = run
        self.recorded = recorded
        self.next_index = 0
        self.replies = queue.Queue()
        self.stopped = threading.Event()

    @property
    def run_id(self):
        return self.run.id

    def step(self, name, fn):
        """Runs `fn()` once as step `name` and answers its (JSON) result; replays a recorded one."""
        index = self.next_index
        self.next_index += 1
        if index < len(self.recorded):
            recorded = self.recorded[index]
            if recorded.name != name:
                raise Failed(
                    f"nondeterministic: step {index} is recorded as {recorded.name!r}, "
                    f"the code asked for {name!r}"
                )
            return json.loads(recorded.result_json or "null")
        if self.stopped.is_set():
            raise Stopped()
        result = fn()
        self.worker.send(
            step={
                "run_id": self.run.id,
                "epoch": self.run.epoch,
                "index": index,
                "name": name,
                "result_json": json.dumps(result),
            }
        )
        while True:
            reply = self.replies.get()
            if reply is None:
                raise Stopped()
            if reply.index == index:
                break
        if reply.error:
            raise Stopped(reply.error)
        return result


class Worker:
    """One stream to a node: a hello, then activations in and steps and ends out."""

    def __init__(self, node, worker_id, types):
        self.node = node
        self.worker_id = worker_id
        self.types = types  # {(name, version): fn(ctx, input)}
        self.outbox = queue.Queue()
        self.runs = {}
        self.lock = threading.Lock()

    def send(self, **fields):
        self.outbox.put(fields)

    def requests(self):
        hello = {
            "worker_id": self.worker_id,
            "types": [{"name": n, "version": v} for (n, v) in self.types],
        }
        yield self.message_class(hello=hello)
        while True:
            fields = self.outbox.get()
            if fields is None:
                return
            yield self.message_class(**fields)

    def run(self):
        metadata = []
        if os.environ.get("LODGE_TOKEN"):
            metadata.append(("authorization", "Bearer " + os.environ["LODGE_TOKEN"]))
        with grpc.insecure_channel(self.node) as channel:
            pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
            work = pool.FindServiceByName(SERVICE).FindMethodByName("Work")
            self.message_class = message_factory.GetMessageClass(work.input_type)
            task_class = message_factory.GetMessageClass(work.output_type)
            call = channel.stream_stream(
                f"/{SERVICE}/Work",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=task_class.FromString,
            )
            print(f"worker {self.worker_id} serving {sorted(self.types)} at {self.node}", flush=True)
            try:
                for task in call(self.requests(), metadata=metadata):
                    self.take(task)
            finally:
                self.outbox.put(None)
                with self.lock:
                    for ctx in self.runs.values():
                        ctx.stopped.set()
                        ctx.replies.put(None)

    def take(self, task):
        kind = task.WhichOneof("kind")
        if kind == "activation":
            run = task.activation.run
            fn = self.types.get((run.type, run.version))
            ctx = Ctx(self, run, list(task.activation.steps))
            with self.lock:
                self.runs[run.id] = ctx
            threading.Thread(target=self.activate, args=(ctx, fn), daemon=True).start()
        elif kind == "recorded":
            with self.lock:
                ctx = self.runs.get(task.recorded.run_id)
            if ctx:
                ctx.replies.put(task.recorded)
        elif kind == "stop_run_id":
            with self.lock:
                ctx = self.runs.get(task.stop_run_id)
            if ctx:
                ctx.stopped.set()
                ctx.replies.put(None)

    def activate(self, ctx, fn):
        """Runs the code from the top (replaying what is recorded) and sends how it ended."""
        finish = {"run_id": ctx.run.id, "epoch": ctx.run.epoch}
        try:
            result = fn(ctx, json.loads(ctx.run.input_json or "null"))
            finish["result_json"] = json.dumps(result)
        except Stopped:
            finish = None
        except Failed as e:
            finish.update(error=str(e) or "failed", retry=False)
        except Exception as e:  # noqa: BLE001 - any other error is tried again from the record
            finish.update(error=f"{type(e).__name__}: {e}", retry=True)
        with self.lock:
            # A later activation of the same run may have taken its place already.
            if self.runs.get(ctx.run.id) is ctx:
                del self.runs[ctx.run.id]
        if finish is not None:
            self.send(finish=finish)


def pipeline(journal, worker_id, hold):
    """Type py-pipeline v1: three steps, each leaving a line in `journal` when it runs."""

    def effect(ctx, step):
        if hold and hold[0] == step:
            while not os.path.exists(hold[1]):
                if ctx.stopped.is_set():
                    raise Stopped()
                time.sleep(0.05)
        if journal:
            with open(journal, "a") as f:
                f.write(f"{ctx.run_id} {step} {worker_id}\n")

    def run(ctx, input):
        items = ctx.step("fetch", lambda: (effect(ctx, "fetch"), list(input["items"]))[1])
        upper = ctx.step(
            "transform", lambda: (effect(ctx, "transform"), [i.upper() for i in items])[1]
        )
        count = ctx.step("publish", lambda: (effect(ctx, "publish"), len(upper))[1])
        return {"items": upper, "published": count}

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--node", required=True, help="HOST:PORT of a node's client port")
    p.add_argument("--id", required=True, help="this worker's name, unique on its node")
    p.add_argument("--journal", help="file each step appends a line to when it runs")
    p.add_argument("--hold", help="STEP:FILE: wait for FILE before running STEP")
    args = p.parse_args()
    hold = tuple(args.hold.split(":", 1)) if args.hold else None
    types = {("py-pipeline", 1): pipeline(args.journal, args.id, hold)}
    pause = 0.5
    while True:
        try:
            Worker(args.node, args.id, types).run()
        except grpc.RpcError as e:
            print(f"worker {args.id}: {e.code().name}: {e.details()}", file=sys.stderr)
            # A node that is down, restarting or shutting down: connect again, as a worker must
            # (its runs wait for it, or go to another worker). Anything else is a mistake to fix.
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                sys.exit(1)
        time.sleep(pause)
        pause = min(pause * 2, 5.0)


if __name__ == "__main__":
    main()
