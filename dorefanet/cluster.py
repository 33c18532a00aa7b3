"""Which machines train together, from ``--cluster/--task`` or ``TF_CONFIG``, and whether they agree.

TensorFlow-free, so that parsing the flags imports no TensorFlow (the packed
engine's ``--eval`` / ``--run``); the training itself is :mod:`dorefanet.distributed`.
"""
import json
import os
import socket

__all__ = ["Cluster", "DistributedError", "cluster_from_tf_config", "cluster_from_flags", "resolve_cluster",
           "check_agreement", "free_local_ports", "DEFAULT_TIMEOUT"]

#: Seconds a worker waits for the others at start-up and inside each collective op before it gives up.
#: The chief validates and writes a checkpoint at the end of every epoch while the others wait in the
#: next step's all-reduce, so this must exceed that time (ImageNet's validation on a slow machine).
DEFAULT_TIMEOUT = 600


class DistributedError(RuntimeError):
    """The workers cannot train together (one-line message naming the worker, flag or address)."""


class Cluster:
    """The workers' ``host:port`` addresses and this process's index among them (0: the chief)."""

    def __init__(self, workers, index):
        self.workers = list(workers)
        self.index = int(index)

    @property
    def size(self):
        return len(self.workers)

    @property
    def is_chief(self):
        return self.index == 0

    def __eq__(self, other):
        return isinstance(other, Cluster) and (self.workers, self.index) == (other.workers, other.index)

    def __repr__(self):
        return "Cluster({!r}, {})".format(self.workers, self.index)


def _check_address(address, where):
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("{}: {!r} is not host:port".format(where, address))
    return address


def cluster_from_flags(cluster, task):
    """``--cluster host:port,host:port --task i`` as a :class:`Cluster`; ``ValueError`` names the flag."""
    workers = [_check_address(part.strip(), "--cluster") for part in cluster.split(",")]
    if len(set(workers)) != len(workers):
        raise ValueError("--cluster lists an address twice: {}".format(cluster))
    if task is None:
        raise ValueError("--cluster needs --task I, this machine's index in it (0 = the chief)")
    if not 0 <= task < len(workers):
        raise ValueError("--task {} is not an index of the {} workers of --cluster (0..{})".format(
            task, len(workers), len(workers) - 1))
    return Cluster(workers, task)


def cluster_from_tf_config(text):
    """The ``TF_CONFIG`` JSON (``{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": i}}``)."""
    try:
        config = json.loads(text)
    except ValueError as err:
        raise ValueError("TF_CONFIG is not valid JSON ({})".format(err)) from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise ValueError('TF_CONFIG needs {"cluster": {"worker": ["host:port", ...]}, "task": {...}}')
    jobs = set(config["cluster"]) - {"worker"}
    if jobs:
        raise ValueError("TF_CONFIG: only a 'worker' job is supported (all-reduce, no parameter servers), "
                         "got {}".format(", ".join(sorted(jobs))))
    workers = config["cluster"].get("worker")
    if not isinstance(workers, list) or not workers or not all(isinstance(w, str) for w in workers):
        raise ValueError('TF_CONFIG: cluster.worker must be a list of "host:port" strings')
    task = config.get("task")
    if not isinstance(task, dict) or task.get("type", "worker") != "worker" or \
            not isinstance(task.get("index"), int) or isinstance(task.get("index"), bool):
        raise ValueError('TF_CONFIG: task must be {"type": "worker", "index": I}')
    for address in workers:
        _check_address(address, "TF_CONFIG")
    if len(set(workers)) != len(workers):
        raise ValueError("TF_CONFIG lists a worker address twice")
    if not 0 <= task["index"] < len(workers):
        raise ValueError("TF_CONFIG: task index {} is not an index of the {} workers".format(
            task["index"], len(workers)))
    return Cluster(workers, task["index"])


def resolve_cluster(args, environ=None):
    """The :class:`Cluster` of ``args.cluster/args.task`` and ``TF_CONFIG``, or ``None`` for one machine.

    Both may be given only if they say the same.  ``ValueError`` (a one-line message) otherwise.
    """
    environ = os.environ if environ is None else environ
    from_flags = None
    if args.cluster is not None:
        from_flags = cluster_from_flags(args.cluster, args.task)
    elif args.task is not None:
        raise ValueError("--task needs --cluster host:port,host:port,...")
    text = environ.get("TF_CONFIG", "").strip()
    from_env = cluster_from_tf_config(text) if text else None
    if from_flags is not None and from_env is not None and from_flags != from_env:
        raise ValueError("--cluster/--task ({} task {}) and TF_CONFIG ({} task {}) disagree; give one of them".format(
            ",".join(from_flags.workers), from_flags.index, ",".join(from_env.workers), from_env.index))
    return from_flags or from_env


def check_agreement(records, fields):
    """Raise :class:`DistributedError` naming the first of ``fields`` on which a worker differs from the chief."""
    chief = records[0]
    for index, record in enumerate(records[1:], 1):
        for field in fields:
            if record.get(field) != chief.get(field):
                raise DistributedError(
                    "worker {} has {} {} but the chief (worker 0) has {}: start every worker with the same "
                    "flags".format(index, _FIELD_NAMES.get(field, "--" + field.replace("_", "-")),
                                   record.get(field), chief.get(field)))


#: How the error names a handshake field that is not the flag of the same name.
_FIELD_NAMES = {"model": "model (script)", "towers": "towers (--gpu)", "data": "data (--fake or --data)",
                "cluster": "the worker list (--cluster or TF_CONFIG)", "layer_table": "the --layer-bits table"}


def free_local_ports(count):
    """``count`` ports free on 127.0.0.1 right now, for a cluster on one machine (tests, benchmarks).

    All are bound at once, so they are distinct; another process may still take one before the workers do.
    """
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
