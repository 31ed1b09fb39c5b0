"""One process of an evaluation on localhost (tests/test_eval_scale.py): the features of two image folders
as banks sharded over every process's devices, k-NN and linear-probe top-1; process 0 writes them as JSON.

python -m tests.eval_scale_child FOLDER OUT PORT PROCESS_ID NUM_PROCESSES
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dmt_jax import data, evaluate, parallel


def main(folder: str, out: str, port: str, process_id: int, num_processes: int):
    if num_processes > 1:
        jax.distributed.initialize(f"localhost:{port}", num_processes=num_processes, process_id=process_id)
    mesh = parallel.make_mesh(-1, 1)
    projection = jnp.asarray(np.random.default_rng(0).standard_normal((16 * 16 * 3, 24)), jnp.float32)

    @jax.jit
    def features(projection, pixels):
        return (pixels.reshape(pixels.shape[0], -1).astype(jnp.float32) / 255.0) @ projection

    def bank(split):
        batches = data.EvalInput(
            data.FolderSource(f"{folder}/{split}"),
            global_batch=8,
            img_size=16,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            threads=1,
        )
        (b,) = evaluate.collect_banks(features, batches, mesh, projection)
        return b

    train, queries = bank("train"), bank("eval")
    local = sum(s.data.size for s in train.x.addressable_shards)
    result = {
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "rows": train.count(),
        "local_fraction": local / train.x.size,  # the bank's share this process holds
        "knn": evaluate.knn_top1(train, queries, k=5),
        "probe": evaluate.linear_probe_top1(train, queries, epochs=40, batch_size=32),
    }
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
