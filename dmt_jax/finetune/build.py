"""The fine-tuning's setup: model, sharded state (the init's weights placed), the jitted step and the
prediction function, on a mesh (the distillation's train.sharded_init and train.guarded_update)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dmt_jax import flops, mixup, objective, parallel, train
from dmt_jax.finetune.model import Classifier, FinetuneState, build_model
from dmt_jax.finetune.pretrained import Pretrained, load_pretrained
from dmt_jax.finetune.recipe import make_optimizer, smooth_one_hot
from dmt_jax.teachers import IMAGENET_MEAN, IMAGENET_STD


@dataclasses.dataclass
class FinetuneSetup:
    config: Any
    mesh: Any
    model: Classifier
    pretrained: Pretrained | None
    num_classes: int
    steps: int
    init_state: Any  # rng -> sharded FinetuneState (pretrained weights placed)
    step: Any  # jitted (state, batch) -> (state, metrics)
    abstract_state: Any
    predict: Any  # jitted (params, pixels) -> top-5 class indices
    mean: tuple  # the input normalization (the init's; ImageNet's for a random init)
    std: tuple

    @property
    def flops_per_image(self) -> float:
        enc = self.model.encoder
        tokens = (self.config.img_size // enc.patch_size) ** 2 + enc.num_prefix_tokens
        return 3.0 * flops.vit_flops(enc.width, enc.depth, tokens, enc.patch_size, enc.mlp_dim)


def build(config, mesh, num_train_examples: int, num_classes: int) -> FinetuneSetup:
    pretrained = load_pretrained(config.init) if config.init else None
    model = build_model(config, pretrained, num_classes)
    mean, std = (pretrained.mean, pretrained.std) if pretrained else (IMAGENET_MEAN, IMAGENET_STD)
    steps = train.total_steps(config, num_train_examples)
    dummy = jnp.zeros((1, config.img_size, config.img_size, 3), jnp.float32)
    param_shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy)["params"])
    tx, schedule = make_optimizer(
        config, param_shapes, model.encoder.depth, steps, num_train_examples / config.batch_size
    )
    use_ema = config.ema_decay > 0

    def init_fn(rng):
        r_params, r_state = jax.random.split(rng)
        params = model.init(r_params, dummy)["params"]
        ema = params if use_ema else jnp.zeros(())
        return FinetuneState(jnp.zeros((), jnp.int32), params, tx.init(params), r_state, ema)

    random_init, state_shardings, abstract_state = train.sharded_init(init_fn, mesh, config.fsdp_min_size)

    def init_state(rng):
        state = random_init(rng)
        params = state.params
        if pretrained:
            # The encoder's weights replace the random ones (Adam's moments start at zero either way);
            # a final norm the classifier does not use (mean pooling + fc_norm, as MAE) is left out.
            loaded = {k: v for k, v in pretrained.params.items() if k in params["encoder"]}
            shardings = {k: state_shardings.params["encoder"][k] for k in loaded}
            placed = parallel.place_from_host(loaded, shardings)
            params = dict(params, encoder={**params["encoder"], **placed})
        # The EMA starts as its own copy of the weights (the step donates both: they may not share buffers).
        ema = jax.tree.map(lambda p: p.copy(), params) if use_ema else state.ema
        return state.replace(params=params, ema=ema)

    def normalized(pixels):
        return objective.normalize_pixels(pixels, mean, std, jnp.dtype(config.dtype))

    def step_fn(state: FinetuneState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        r_mix, r_drop = jax.random.split(rng)
        pixels = batch["image"]
        targets = smooth_one_hot(batch["label"], num_classes, config.label_smoothing)
        if config.mixup_alpha > 0 or config.cutmix_alpha > 0:  # within each device's shard: no collective
            pixels, targets = mixup.mix_per_shard(r_mix, config, pixels, targets, mesh)

        def loss_fn(params):
            logits = model.apply({"params": params}, normalized(pixels), train=True, rngs={"dropout": r_drop})
            return optax.softmax_cross_entropy(logits, targets).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        params, opt_state, finite, grad_norm = train.guarded_update(
            tx, grads, loss, state.params, state.opt_state
        )
        ema = state.ema
        if use_ema:
            ema = jax.tree.map(lambda e, p: config.ema_decay * e + (1 - config.ema_decay) * p, ema, params)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "nonfinite": 1 - finite.astype(jnp.int32),
        }
        return FinetuneState(state.step + 1, params, opt_state, state.rng, ema), metrics

    batch_sharding = parallel.batch_sharding(mesh)
    step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, {"image": batch_sharding, "label": batch_sharding}),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )

    @jax.jit
    def predict(params, pixels):
        logits = model.apply({"params": params}, normalized(pixels))
        return jax.lax.top_k(logits, min(5, num_classes))[1]

    return FinetuneSetup(
        config,
        mesh,
        model,
        pretrained,
        num_classes,
        steps,
        init_state,
        step,
        abstract_state,
        predict,
        mean,
        std,
    )
