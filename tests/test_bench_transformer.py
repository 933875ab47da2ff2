"""benchmarks/throughput.py's transformer rows compare the same model: the PyTorch reference has lth's
parameter shapes (so equal FLOPs) and computes the same function given lth's weights."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lth.config import ModelConfig  # noqa: E402
from lth.models import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("_bench_throughput", ROOT / "benchmarks/throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _lth_to_torch(params: dict, net, name: str) -> None:
    """Copy lth's weights into the torch reference (Dense kernels [in, out] -> Linear weights [out, in])."""
    sd = {}
    flat = {"/".join(str(k.key) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    rename = {"ln_1": "ln_0", "ln_2": "ln_1", "mlp/in": "fc_in", "mlp/out": "fc_out", "attn/": ""} if name == "gpt" \
        else {"mlp/fc_in": "fc_in", "mlp/fc_out": "fc_out", "attn/": ""}
    for key, v in flat.items():
        k = key
        for a, b in rename.items():
            k = k.replace(a, b)
        k = k.replace("block_", "blocks.").replace("/", ".").replace("kernel", "weight").replace("scale", "weight")
        k = {"output.weight": "head.weight", "output.bias": "head.bias", "cls.embedding": "cls",
             "pos.embedding": "pos", "embed.embedding": "embed.weight", "pos_embed.embedding": "pos.weight"}.get(k, k)
        w = v.T.copy() if key.endswith("kernel") else v.copy()
        sd[k] = torch.from_numpy(w).reshape(net.state_dict()[k].shape)
    net.load_state_dict(sd)


@pytest.mark.parametrize("name", ["vit", "gpt"])
def test_torch_reference_is_the_same_model(bench, name):
    model, batch, train = bench.TRANSFORMER_WORKLOADS[name]
    data, classes = bench.transformer_data(name)
    net = bench.torch_transformer(name, model, classes)
    lth_model = build_model(ModelConfig(**model), classes, np.shape(data.x_train)[1:])
    x = np.asarray(data.x_train[:3], np.float32)
    params = lth_model.init(jax.random.key(0), jnp.asarray(x))["params"]
    n_lth = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert n_lth == sum(p.numel() for p in net.parameters())
    _lth_to_torch(params, net, name)
    ours = np.asarray(lth_model.apply({"params": params}, jnp.asarray(x)))
    with torch.no_grad():
        xt = torch.from_numpy(x) if name == "vit" else torch.from_numpy(x.astype(np.int64))
        theirs = net(xt).numpy()
    np.testing.assert_allclose(theirs, ours, rtol=2e-4, atol=2e-4)
