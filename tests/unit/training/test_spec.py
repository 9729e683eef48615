"""torchtitan_runai.training.spec: our train specs are torchtitan's llama3 with our functions."""

from __future__ import annotations

from torchtitan_runai import FUSED_TRAIN_SPEC_NAME, TRAIN_SPEC_NAME, upstream
from torchtitan_runai.training import data, fused_head, loss, metrics, spec, tokenizer


def test_our_specs_are_torchtitans_llama3_with_our_functions():
    ours, stock = upstream.get_train_spec(TRAIN_SPEC_NAME), upstream.get_train_spec("llama3")
    assert ours.model_cls is stock.model_cls and ours.model_args is stock.model_args
    assert ours.build_loss_fn is loss.build_loss_fn
    assert ours.build_tokenizer_fn is tokenizer.build_tokenizer
    assert ours.build_dataloader_fn is data.build_dataloader
    assert ours.build_metrics_processor_fn is metrics.build_metrics_processor
    assert ours.parallelize_fn is spec.parallelize and stock.build_loss_fn is not loss.build_loss_fn
    fused = upstream.get_train_spec(FUSED_TRAIN_SPEC_NAME)
    assert fused.model_cls is fused_head.FusedHeadTransformer and fused.build_loss_fn is loss.build_loss_fn
