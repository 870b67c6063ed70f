"""torch.compile-friendliness: the model's forward traces into one graph (no graph breaks).

``torch._dynamo.explain`` traces without compiling (a few seconds each on the CPU for itpn_nano
at 64 px), so these run in the default suite.
"""

import pytest
import torch

from itpn_d2.modeling import build_itpn

IDS_KEEP = torch.tensor([[0, 3, 5, 6, 9, 15], [1, 2, 4, 8, 10, 12]])  # 6 of the 4x4 tokens


def explain(fn, *args):
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(fn)(*args)
    finally:
        torch._dynamo.reset()


def assert_one_graph(result):
    reasons = [str(b.reason) for b in result.break_reasons]
    assert result.graph_break_count == 0, reasons
    assert result.graph_count == 1


@pytest.mark.parametrize("rpe, masked", [(False, False), (False, True), (True, True)],
                         ids=["full", "ids_keep", "ids_keep-rpe"])
def test_itpn_forward_has_no_graph_breaks(rpe, masked):
    model = build_itpn("itpn_nano", img_size=64, rpe=rpe).eval()
    images = torch.randn(2, 3, 64, 64)
    args = (images, IDS_KEEP) if masked else (images,)
    assert_one_graph(explain(model.forward_pyramid, *args))


def test_itpn_training_forward_has_no_graph_breaks():
    # Training mode: drop path active, gradient checkpointing of every block, position tables
    # (absolute and relative) resized from the 64 px pretraining grid to a 96 px input.
    model = build_itpn("itpn_nano", img_size=64, rpe=True, drop_path_rate=0.1,
                       use_checkpoint=True).train()
    assert_one_graph(explain(model.forward_pyramid, torch.randn(2, 3, 96, 96)))


def test_pretraining_forward_has_no_graph_breaks():
    # MIM decoder + MFM heads + EMA teacher (no_grad, full image) in one graph.
    from pretrain.models import build_pretrain_model, random_masking

    args = dict(model="itpn_nano", input_size=64, rpe=False, pyramid="on", fpn_depth=2,
                mfm="ema")
    model = build_pretrain_model(args).train()
    masks = random_masking(2, 16, 0.75, torch.Generator().manual_seed(0))
    assert_one_graph(explain(model, torch.randn(2, 3, 64, 64), masks))
