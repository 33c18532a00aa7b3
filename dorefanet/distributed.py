"""Synchronous data-parallel training over several machines on TensorFlow's own distributed runtime.

One process per machine (its local ``--gpu`` towers as usual); the processes
("workers") find each other through ``TF_CONFIG`` or ``--cluster/--task``.
Each worker runs a ``tf.distribute.Server`` (gRPC) and builds its own graph;
the only communication is through collective ops between the workers' graphs:

* gradients: each worker sums its towers' gradients, packs them into one
  vector per dtype and all-reduces it (``collective_ops.all_reduce``, ``Add``)
  with the other workers; every tower then applies the sum divided by the
  number of towers in the cluster, so every worker applies the same averaged
  gradient with the same optimizer and the variables stay identical.  Batch
  norm statistics stay per tower (the chief's are the ones saved), as in
  tensorpack's replicated trainer;
* start: a handshake (``all_gather`` of each worker's configuration as JSON)
  refuses mismatched workers and tells the others where the chief resumes;
  then every variable is broadcast from the chief (``broadcast_send/recv``),
  so the workers need neither the same seed nor the chief's checkpoint files;
* failure: the handshake runs with a deadline and every collective op with a
  timeout (``--worker-timeout``), so a worker that never comes up or dies makes
  the others stop with a one-line error instead of waiting forever.

Only the chief (task 0) writes checkpoints, ``config.json`` and ``stats.json``
and validates; the others log to ``LOGDIR.worker<i>``.
"""
import json
import os
import socket
import time

from dorefanet.tf_setup import tf

import numpy as np  # noqa: E402

from dorefanet.cluster import (DEFAULT_TIMEOUT, Cluster, DistributedError, check_agreement,  # noqa: E402,F401
                               cluster_from_flags, cluster_from_tf_config, resolve_cluster)

__all__ = ["Worker", "CollectiveTrainer", "fake_train_flow", "follower_plan", "translate_runtime_error", "CHECK_ENV",
           # re-exported from dorefanet.cluster (TensorFlow-free):
           "Cluster", "DistributedError", "cluster_from_tf_config", "cluster_from_flags", "resolve_cluster",
           "check_agreement", "DEFAULT_TIMEOUT"]

#: Developer switch (tests): compare every variable's fingerprint across the workers after every step
#: and dump each worker's variables to ``<its logdir>/replica-variables.npz`` at every epoch end (and the
#: step checked last to ``replica-steps``).
CHECK_ENV = "DOREFANET_CHECK_REPLICAS"
#: The handshake's JSON must fit this many bytes (it holds a few short fields and an error line).
_HANDSHAKE_BYTES = 4096
_GROUP_KEY = 1
# Instance keys: one range per purpose, identical on every worker (a collective op is matched across
# workers by its keys; a session.run's collective ops must have the same keys on every worker).
_KEY_HANDSHAKE = 1
_KEY_CHECK = 10
_KEY_BROADCAST = 100
_KEY_GRADIENTS = 1000


def fake_train_flow(batch_size, image_size, seed, num_classes=1000):
    """Training batches of ``--fake``: one batch seeded by ``seed`` (images 0..255, labels), repeated.

    Every tower of every worker gets this batch, so that a cluster trains on
    what the towers of one process would.  The towers of one process take
    their batches from one queue in no fixed order, and tensorpack updates the
    batch-norm moving statistics from the first tower's batch only, so with
    distinct batches per tower the one-process run would depend on which tower
    took which batch.  The workers still compute different gradients wherever
    fg adds its noise (G < 32): each worker draws its own.
    """
    from tensorpack.dataflow import DataFromList

    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, (batch_size, image_size, image_size, 3)).astype(np.uint8)
    labels = rng.randint(0, num_classes, batch_size).astype(np.int32)
    return DataFromList([[images, labels]], shuffle=False)


def follower_plan(logdir, index, chief_step, steps_per_epoch):
    """Where a worker other than the chief starts: the chief's step (it gets the variables by broadcast).

    It logs to ``LOGDIR.worker<i>``, beside the chief's, so that ``--overwrite``
    moving the chief's logdir aside does not pull it away from under it, and
    holds that directory as the chief holds its own.
    """
    from dorefanet.logdir_lock import lock_logdir
    from dorefanet.training import RunPlan

    own = "{}.worker{}".format(logdir.rstrip("/"), index)
    return RunPlan(own, None, chief_step, chief_step // steps_per_epoch + 1, lock_logdir(own))


# ---------------------------------------------------------------------------------------------
# the server, the handshake

def _device(index):
    return "/job:worker/replica:0/task:{}/device:CPU:0".format(index)


def _listening(address, timeout=1.0):
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


class Worker:
    """This process's gRPC server and what its sessions need to reach the other workers."""

    def __init__(self, cluster, timeout=DEFAULT_TIMEOUT):
        self.cluster = cluster
        self.timeout = float(timeout)
        spec = tf.train.ClusterSpec({"worker": cluster.workers})
        try:
            self.server = tf.train.Server(spec, job_name="worker", task_index=cluster.index,
                                          config=self.patch_config(tf.ConfigProto()), start=True)
        except (tf.errors.OpError, RuntimeError) as err:
            raise DistributedError("cannot start the gRPC server of worker {} at {} ({}); is the port free?".format(
                cluster.index, cluster.workers[cluster.index], _first_line(err))) from None

    @property
    def device(self):
        return _device(self.cluster.index)

    def patch_config(self, config):
        """``config`` for a session on this server: collectives led by the chief, only local devices."""
        config.experimental.collective_group_leader = "/job:worker/replica:0/task:0"
        # Without the filter, creating a session waits for every worker of the cluster to answer.
        del config.device_filters[:]
        config.device_filters.append("/job:worker/task:{}".format(self.cluster.index))
        return config

    def session(self, config=None):
        return tf.Session(self.server.target, config=self.patch_config(config or tf.ConfigProto()))

    def handshake(self, record):
        """Exchange ``record`` (JSON-able) with every worker; returns the list of records by worker index.

        Waits at most ``timeout`` seconds for the others to join; then raises
        :class:`DistributedError` naming the addresses where nothing listens.
        """
        from tensorflow.python.ops import collective_ops

        data = json.dumps(record, sort_keys=True).encode("utf-8")
        if len(data) > _HANDSHAKE_BYTES:
            raise DistributedError("the start-up record of worker {} is too long ({} bytes)".format(
                self.cluster.index, len(data)))
        padded = np.zeros(_HANDSHAKE_BYTES, np.int32)
        padded[:len(data)] = np.frombuffer(data, np.uint8)
        with tf.Graph().as_default():
            with tf.device(self.device):
                gathered = collective_ops.all_gather(tf.constant(padded), self.cluster.size, _GROUP_KEY,
                                                     _KEY_HANDSHAKE, timeout=self.timeout)
            start = time.time()
            with self.session() as sess:
                try:
                    values = sess.run(gathered, options=tf.RunOptions(timeout_in_ms=int(self.timeout * 1000)))
                except tf.errors.OpError as err:
                    raise self._not_joined(time.time() - start, err) from None
        records = []
        for row in values.reshape(self.cluster.size, _HANDSHAKE_BYTES):
            records.append(json.loads(bytes(row[row != 0].astype(np.uint8)).decode("utf-8")))
        return records

    def _not_joined(self, waited, err):
        others = [(i, a) for i, a in enumerate(self.cluster.workers) if i != self.cluster.index]
        silent = ["worker {} ({})".format(i, a) for i, a in others if not _listening(a)]
        if silent:
            who = "nothing listens at " + ", ".join(silent)
        else:
            who = "every worker's port answers, but not all of them joined ({})".format(_first_line(err))
        return DistributedError(
            "worker {} waited {:.0f} s (--worker-timeout {:g}) for the other workers to start: {}; start one "
            "process per address of --cluster/TF_CONFIG, each with its own --task".format(
                self.cluster.index, waited, self.timeout, who))


_TELLING = ("aborted", "timed out", "timeout", "deadline", "socket", "unavailable", "connect", "refused")


def _first_line(err):
    """The line of a TensorFlow error that says what happened (its first line is "Graph execution error:")."""
    text = getattr(err, "message", None) or str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if line != "Graph execution error:" and not line.startswith(("File ", "From /job"))]
    telling = [line for line in lines if any(word in line.lower() for word in _TELLING)]
    return (telling or lines or [type(err).__name__])[0][:300]


def translate_runtime_error(err, cluster, timeout):
    """The one-line :class:`DistributedError` for a collective op that failed during training."""
    return DistributedError(
        "worker {}: the all-reduce with the other workers failed or did not complete within --worker-timeout {:g} "
        "s ({}: {}): a worker died, hangs or stopped; restart every worker with the same command to resume from "
        "the chief's last checkpoint".format(cluster.index, timeout, type(err).__name__, _first_line(err)))


# ---------------------------------------------------------------------------------------------
# the trainer

def _pack(tensors):
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)


def _unpack(vector, like):
    sizes = [int(np.prod(t.shape.as_list())) for t in like]
    return [tf.reshape(part, t.shape) for part, t in zip(tf.split(vector, sizes), like)]


def _by_dtype(tensors):
    groups = {}
    for position, t in enumerate(tensors):
        groups.setdefault(t.dtype.base_dtype, []).append(position)
    return sorted(groups.items(), key=lambda item: item[0].name)


def _make_builder_class():
    # tensorpack is imported lazily (after tf_setup), as everywhere in the project.
    from tensorpack.graph_builder.training import SyncMultiGPUReplicatedBuilder
    from tensorpack.graph_builder.utils import merge_grad_list, override_to_local_variable, split_grad_list

    class CollectiveBuilder(SyncMultiGPUReplicatedBuilder):
        """tensorpack's replicated towers; the gradients are reduced over the local towers and the cluster."""

        def __init__(self, towers, worker):
            super().__init__(towers, average=True, mode="gpu")
            self.worker = worker

        def allreduce(self, all_grads):
            """Per variable, the mean gradient over every tower of the cluster (towers x vars in, vars out)."""
            from tensorflow.python.ops import collective_ops

            replicas = len(all_grads) * self.worker.cluster.size
            with tf.name_scope("collective_allreduce"), tf.device(self.worker.device):
                # add_n of a single tensor returns it: with one tower this adds nothing.
                local = [tf.add_n(list(grads)) for grads in zip(*all_grads)]
                reduced = [None] * len(local)
                for key, (dtype, positions) in enumerate(_by_dtype(local)):
                    tensors = [local[p] for p in positions]
                    summed = collective_ops.all_reduce(_pack(tensors), self.worker.cluster.size, _GROUP_KEY,
                                                       _KEY_GRADIENTS + key, "Add", "Id",
                                                       timeout=self.worker.timeout)
                    # the same arithmetic as tensorpack's replicated mean: sum, then times 1 / towers
                    mean = tf.multiply(summed, tf.cast(1.0 / replicas, dtype))
                    for p, value in zip(positions, _unpack(mean, tensors)):
                        reduced[p] = value
            return reduced

        def build(self, grad_list, get_opt_fn):
            from tensorpack.tfutils.common import get_global_step_var

            # tensorpack creates the global step only after the trainer's graph; it must exist now to be
            # broadcast (a resumed worker would otherwise count its steps from 0).
            get_global_step_var()
            all_grads, all_vars = split_grad_list(grad_list)
            reduced = self.allreduce(all_grads)
            self.grads = merge_grad_list([reduced] * len(self.towers), all_vars)
            opt = get_opt_fn()
            train_ops = []
            with tf.name_scope("apply_gradients"):
                for idx, grad_and_vars in enumerate(self.grads):
                    with tf.device("/gpu:{}".format(self.towers[idx])):
                        # as tensorpack does: the other towers' optimizer slots are local variables
                        with override_to_local_variable(enable=idx > 0):
                            train_ops.append(opt.apply_gradients(grad_and_vars, name="apply_grad_{}".format(idx)))
            train_op = tf.group(*train_ops, name="train_op")
            with tf.name_scope("broadcast_from_chief"):
                broadcast = self.broadcast_ops()
            local_sync = None
            if len(self.towers) > 1:
                with tf.name_scope("sync_variables"), tf.control_dependencies([broadcast]):
                    local_sync = SyncMultiGPUReplicatedBuilder.get_post_init_ops()
            return train_op, broadcast, local_sync

        def broadcast_ops(self):
            """Overwrite every global variable with the chief's (model, optimizer slots, step, lr, EMAs)."""
            from tensorflow.python.ops import collective_ops

            variables = tf.global_variables()
            size = self.worker.cluster.size
            assigns = []
            with tf.device(self.worker.device):
                for key, (dtype, positions) in enumerate(_by_dtype(variables)):
                    group = [variables[p] for p in positions]
                    instance = _KEY_BROADCAST + key
                    if self.worker.cluster.is_chief:
                        vector = _pack([v.read_value() for v in group])
                        received = collective_ops.broadcast_send(vector, vector.shape, dtype, size, _GROUP_KEY,
                                                                 instance, timeout=self.worker.timeout)
                    else:
                        total = sum(int(np.prod(v.shape.as_list())) for v in group)
                        received = collective_ops.broadcast_recv([total], dtype, size, _GROUP_KEY, instance,
                                                                 timeout=self.worker.timeout)
                    for v, value in zip(group, _unpack(received, group)):
                        assigns.append(v.assign(value, read_value=False))
            return tf.group(*assigns, name="broadcast_variables")

    return CollectiveBuilder


def _make_trainer_class():
    from tensorpack import RunOp, SyncMultiGPUTrainerReplicated
    from tensorpack.tfutils.sesscreate import NewSessionCreator

    from dorefanet.training import gated_trainer

    # Gated as the one-process trainers (training.gate_gradients): an update waits for the whole backward
    # pass.  The all-reduce of one packed vector already waits for every gradient; the gate keeps that so
    # should the packing change.
    class CollectiveTrainer(gated_trainer(SyncMultiGPUTrainerReplicated)):
        """Replicated towers on each worker, gradients all-reduced across the workers (see the module doc)."""

        def __init__(self, towers, worker):
            super().__init__(towers)
            self.worker = worker
            self._builder = _make_builder_class()(self.devices, worker)

        def _setup_graph(self, input, get_cost_fn, get_opt_fn):
            tower_fn = self._make_get_grad_fn(input, get_cost_fn, get_opt_fn)
            grad_list = self._builder.call_for_each_tower(tower_fn)
            self.train_op, broadcast, local_sync = self._builder.build(grad_list, get_opt_fn)
            start = RunOp(broadcast if local_sync is None else local_sync, run_before=True, run_as_trigger=False,
                          verbose=True)
            start.name_scope = "BroadcastFromChief"
            callbacks = [start]
            if local_sync is not None:
                # as the replicated trainer: re-copy tower 0 to the local towers every epoch (no collective)
                callbacks.append(RunOp(_local_sync_only(), run_before=False, run_as_trigger=True))
            if os.environ.get(CHECK_ENV):
                callbacks.append(_make_check_callback(self.worker))
            return callbacks

        def initialize_hooks(self):
            from tensorflow.python.training.monitored_session import _MonitoredSession
            from tensorpack.tfutils.sesscreate import ReuseSessionCreator

            # tensorpack's MonitoredSession treats Unavailable and Aborted (how a collective op reports a
            # lost worker) as a preemption: it closes the session and "recovers" by reusing the closed one,
            # which hides the real error behind "Attempted to use a closed Session". Do not recover.
            _fix_tensorpack_failure_log()
            self.hooked_sess = _MonitoredSession(ReuseSessionCreator(self.sess), self._callbacks.get_hooks(),
                                                 should_recover=False)

        def initialize(self, session_creator, session_init):
            config = getattr(session_creator, "config", None) or tf.ConfigProto()
            super().initialize(NewSessionCreator(self.worker.server.target, self.worker.patch_config(config)),
                               session_init)

    return CollectiveTrainer


class _FailureLogFilter:
    """tensorpack 0.11 logs ``logger.error("Training failed at global_step=", step)``: a format string
    without ``%s``, so Python's logging prints "--- Logging error ---" and a traceback on stderr,
    burying the one-line error. This adds the missing ``%s``."""

    def filter(self, record):
        if record.msg == "Training failed at global_step=" and record.args:
            record.msg = "Training failed at global_step=%s"
        return True


def _fix_tensorpack_failure_log():
    import logging

    logger = logging.getLogger("tensorpack")
    if not any(isinstance(f, _FailureLogFilter) for f in logger.filters):
        logger.addFilter(_FailureLogFilter())


def _local_sync_only():
    """A second copy of tensorpack's tower-0-to-other-towers sync, without the broadcast before it."""
    from tensorpack.graph_builder.training import SyncMultiGPUReplicatedBuilder

    with tf.name_scope("sync_local_towers"):
        return SyncMultiGPUReplicatedBuilder.get_post_init_ops()


def CollectiveTrainer(towers, worker):  # noqa: N802  (a class built lazily, after tensorpack's import)
    """The trainer of a worker with ``towers`` local towers (``int`` or GPU ids)."""
    return _make_trainer_class()(towers, worker)


# ---------------------------------------------------------------------------------------------
# the developer check: identical variables on every worker after every step

def _fingerprinted(variables):
    """The variables that must be bit-identical on every worker: all but the per-tower batch norm EMAs."""
    return [v for v in variables if not v.op.name.endswith("/EMA")]


def _make_check_callback(worker):
    from tensorflow.python.ops import collective_ops
    from tensorpack import Callback

    class CheckReplicas(Callback):
        """After every step: gather each worker's per-variable sums of the raw bits and compare them."""

        _chief_only = False

        def _setup_graph(self):
            self.variables = _fingerprinted(tf.global_variables())
            with tf.name_scope("check_replicas"), tf.device(worker.device):
                sums = []
                for v in self.variables:
                    value = tf.reshape(v.read_value(), [-1])
                    if value.dtype.size == 4:
                        bits = tf.bitcast(value, tf.int32) if value.dtype != tf.int32 else value
                    else:
                        bits = tf.bitcast(value, tf.int64) if value.dtype != tf.int64 else value
                    sums.append(tf.reduce_sum(tf.cast(bits, tf.int64)))
                self.gather = collective_ops.all_gather(tf.stack(sums), worker.cluster.size, _GROUP_KEY, _KEY_CHECK,
                                                        timeout=worker.timeout)
            self.logdir = None

        def _before_train(self):
            from tensorpack.utils import logger

            self.logdir = logger.get_logger_dir()

        def _trigger_step(self):
            rows = self.trainer.sess.run(self.gather).reshape(worker.cluster.size, -1)
            for index in range(1, worker.cluster.size):
                differ = np.nonzero(rows[index] != rows[0])[0]
                if differ.size:
                    raise DistributedError("after step {}: {} of worker {} differs from the chief's".format(
                        self.global_step, self.variables[differ[0]].op.name, index))
            # how far the checked run is: what a test waits on instead of sleeping
            with open(os.path.join(self.logdir, "replica-steps"), "w") as f:
                f.write(str(self.global_step))

        def _trigger_epoch(self):
            values = self.trainer.sess.run({v.op.name: v for v in tf.global_variables()})
            np.savez(os.path.join(self.logdir, "replica-variables.npz"), **values)

    return CheckReplicas()
