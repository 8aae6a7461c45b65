"""A toy with a known optimum: one layer does not care about precision, so a short PPO run on the
per-step env must give it the fewest bits (and keep the sensitive layer high)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qpolicy import wrap_denoiser
from qpolicy.agents import ppo_jax
from qpolicy.diffusion import make_schedule
from qpolicy.envs import make_core


class TwoPaths(nn.Module):
    """eps = Dense_sensitive(x) + 1e-4 * Dense_insensitive(x): equal MACs, very different sensitivity."""

    @nn.compact
    def __call__(self, x, t):
        b = x.shape[0]
        f = x.reshape(b, -1)
        y = nn.Dense(f.shape[-1], name="sensitive")(f) + 1e-4 * nn.Dense(f.shape[-1], name="insensitive")(f)
        return y.reshape(x.shape)


def test_ppo_gives_insensitive_layer_fewest_bits():
    m = TwoPaths()
    params = m.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,), jnp.int32))
    den = wrap_denoiser(m, params, image_shape=(4, 4, 1), schedule=make_schedule("linear", 100), name="toy")
    assert [l.path for l in den.layers] == ["sensitive", "insensitive"]
    assert den.layers[0].macs == den.layers[1].macs  # same cost: only sensitivity differs
    core = make_core(model=den, num_steps=3, images_per_env=2, bank_size=32, bit_choices=(2, 8), alpha=10.0,
                     lam=5.0)
    cfg = ppo_jax.PPOConfig(num_envs=16, num_steps=6, total_timesteps=16 * 6 * 40, num_minibatches=2,
                            update_epochs=4, lr=3e-3, ent_coef=0.0, gamma=1.0, hidden=(32,))
    res = ppo_jax.train(core, cfg, progress=False)
    act = ppo_jax.policy_fn(cfg, core)
    params0 = res.seed_params(0)
    obs, state = jax.vmap(core.reset, in_axes=(0, None))(jax.random.split(jax.random.key(5), 32),
                                                          core.default_params)
    chosen = []
    for _ in range(3):  # greedy actions at every step of 32 fresh episodes
        a = act(params0, obs, jax.random.key(0), True)
        chosen.append(np.asarray(a))
        obs, state, *_ = jax.vmap(core.step_env, in_axes=(None, 0, 0, None))(jax.random.key(0), state, a,
                                                                             core.default_params)
    bits = np.asarray(core.config.bit_choices)[np.stack(chosen)]  # (steps, episodes, layers)
    sensitive, insensitive = bits[..., 0].mean(), bits[..., 1].mean()
    assert insensitive == 2.0, f"insensitive layer should sit at the fewest bits, got mean {insensitive}"
    assert sensitive > insensitive
