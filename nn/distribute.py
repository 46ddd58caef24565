"""Which tf.distribute strategy a run uses, and which process of a cluster is the chief.

  * several machines: MultiWorkerMirroredStrategy, configured by TF_CONFIG when it is set, otherwise
    from SLURM's variables (SLURM_PROCID, SLURM_NTASKS, the node list); TF's own SlurmClusterResolver
    is not used because it needs nvidia-smi and builds no tasks on CPU-only nodes;
  * one machine with several GPUs (or --num_cpu_replicas > 1): MirroredStrategy;
  * one GPU: OneDeviceStrategy, whose input iterator prefetches the next batches into GPU memory;
  * otherwise TensorFlow's default strategy.

--batch_size is per replica: the global batch is batch_size x replicas, and the learning rate
follows the original's rule lr * global_batch / 128.

Workers of one cluster run in lock step: their collective operations must pair up, so every worker
must run the same number of steps per graph call and save (and stop) at the same step. `make_vote`
lets them agree on that before each call.
"""
import json
import logging
import os
import re
from dataclasses import dataclass

import tensorflow as tf

from nn import config
from nn.config import AiryNetError

log = logging.getLogger("airynet")

SLURM_BASE_PORT = 20000


@dataclass
class Cluster:
    is_chief: bool = True
    task: str = "single process"
    run_dir: str = None  # agreed run directory when several processes must share one


def expand_nodelist(nodelist):
    """'gpu[01-03,07],login1' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1'] (SLURM's hostlist syntax)."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for i in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{i:0{len(first)}d}")
    return hosts


def expand_tasks_per_node(text):
    """SLURM_TASKS_PER_NODE '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for count, repeat in re.findall(r"(\d+)(?:\(x(\d+)\))?", text):
        counts += [int(count)] * int(repeat or 1)
    return counts


def tf_config_from_slurm(env=os.environ):
    """TF_CONFIG for this SLURM task, or None outside a multi-task SLURM step."""
    ntasks = int(env.get("SLURM_NTASKS", "1"))
    if ntasks < 2 or "SLURM_PROCID" not in env:
        return None
    nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    per_node = expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1"))
    per_node += [per_node[-1]] * (len(nodes) - len(per_node))
    port = int(env.get("AIRYNET_PORT", SLURM_BASE_PORT + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    workers = [f"{node}:{port + local}" for node, n in zip(nodes, per_node) for local in range(n)]
    if len(workers) != ntasks:
        raise AiryNetError(f"SLURM_NTASKS={ntasks} does not match the node list {nodes} with tasks per node "
                           f"{per_node}")
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": int(env["SLURM_PROCID"])}}


def _multi_worker_config():
    text = os.environ.get("TF_CONFIG")
    if text:
        try:
            tf_config = json.loads(text)
        except ValueError as e:
            raise AiryNetError(f"TF_CONFIG: not valid JSON ({e})") from e
        if sum(len(v) for v in tf_config.get("cluster", {}).values()) > 1:
            return tf_config
        return None
    tf_config = tf_config_from_slurm()
    if tf_config:
        os.environ["TF_CONFIG"] = json.dumps(tf_config)  # MultiWorkerMirroredStrategy reads it from here
    return tf_config


def make_strategy(cfg):
    """-> (strategy, Cluster). Must run before TensorFlow initialises its devices."""
    tf_config = _multi_worker_config()
    if tf_config:
        task = tf_config["task"]
        has_chief = "chief" in tf_config["cluster"]
        is_chief = task["type"] == "chief" or (not has_chief and task["type"] == "worker" and task["index"] == 0)
        name = cfg.out_dir_name or (f"job{os.environ['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in os.environ else "")
        if not name and not cfg.load_dir:
            raise AiryNetError("--out_dir_name: multi-worker training needs it (or --load_dir), so that every "
                               "worker agrees on the run directory")
        # Checked here, before the workers connect, so that all of them see the same answer (the chief
        # writes the run's config.json right after); only the chief would raise it later.
        run_dir = None if cfg.load_dir else config.new_run_dir(cfg, tag=name)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        return strategy, Cluster(is_chief, f"{task['type']} {task['index']}", run_dir)
    if cfg.num_cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] *
                                                   cfg.num_cpu_replicas)
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices), Cluster()
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy(), Cluster()
    if gpus:
        return tf.distribute.OneDeviceStrategy("/gpu:0"), Cluster()
    return tf.distribute.get_strategy(), Cluster()


def make_vote(strategy):
    """-> vote(stop, save, steps) -> (stop, save, steps) agreed by all workers through one all-reduce:
    stop or save when any worker asks to, and run at most the mean of the steps they propose (every
    worker proposes at most the steps left to the same chunk end, so the mean never overshoots it)."""
    @tf.function
    def all_reduce(proposal):
        return strategy.reduce("MEAN", strategy.run(lambda: tf.identity(proposal)), axis=None)

    def vote(stop, save, steps):
        agreed = all_reduce(tf.constant([float(stop), float(save), float(steps)])).numpy()
        return bool(agreed[0] > 0), bool(agreed[1] > 0), max(1, int(agreed[2]))
    return vote


def log_start(cfg, strategy, resume_path, cluster=None):
    devices = ", ".join(d.name for d in tf.config.list_logical_devices()) or "none"
    log.info("TensorFlow %s; devices: %s", tf.__version__, devices)
    # MultiWorkerMirroredStrategy's class is called CollectiveAllReduceStrategy; log the public name.
    name = ("MultiWorkerMirroredStrategy" if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            else type(strategy).__name__.lstrip("_"))
    log.info("Strategy %s with %d replica(s) in sync%s", name, strategy.num_replicas_in_sync,
             f" ({cluster.task})" if cluster else "")
    log.info("Data format %s; mixed precision %s; XLA-compiled training step %s (the log activation is "
             "XLA-fused in every mode)", "channels_first (NCHW)" if cfg.use_nchw else "channels_last (NHWC)",
             cfg.mixed_precision, "on" if cfg.jit_compile else "off")
    if resume_path:
        log.info("Resuming from %s (step %s)", resume_path, resume_path.rsplit("-", 1)[1])
    else:
        log.info("Starting fresh")
