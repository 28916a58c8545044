"""Where a model instance computes (Triton glue, tested without Triton): device, dtype, cores."""

import torch

from hybridiff.triton.common import instance_device_from_args


def test_gpu_instance_uses_its_device_in_fp16_and_no_cores():
    instance = instance_device_from_args({"model_instance_kind": "GPU", "model_instance_device_id": "1"}, {})
    assert instance.device == torch.device("cuda:1")
    assert instance.dtype == torch.float16
    assert instance.cpu_cores is None


def test_cpu_instance_uses_the_configured_cores_in_fp32():
    instance = instance_device_from_args({"model_instance_kind": "CPU"}, {"cpu_cores": "1"})
    assert instance.device == torch.device("cpu")
    assert instance.dtype == torch.float32
    assert instance.cpu_cores == (1,)
