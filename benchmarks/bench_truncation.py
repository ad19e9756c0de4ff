"""How much a FeatureExtractor saves by stopping after its last hooked layer, and what its CPU
pass layout (channels-last tensors, passes of CPU_MICRO_BATCH images) saves.

Times, in one run, the full classification forward pass against the hooked, truncated pass
for each backbone's preset layers; then the truncated pass in channels-last and contiguous
(NCHW) layout, in passes of 4 and of 16 images. Random weights: the cost does not depend on
their values.
"""
import argparse

import torch
import torchvision

from knnad.backbones import CPU_MICRO_BATCH, PRESET_LAYERS, FeatureExtractor

from _common import best_time, write_results


class _LastLayerDone(Exception):
    pass


def truncated_ms_per_image(name: str, images: torch.Tensor, channels_last: bool,
                           step: int) -> float:
    """Milliseconds per image of the forward pass up to the preset's last layer, in passes of
    ``step`` images, with model and images in channels-last or contiguous layout."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = torchvision.models.get_model(name, weights=None).eval().to(memory_format=layout)
    inputs = images.contiguous(memory_format=layout)

    def stop(*_):
        raise _LastLayerDone

    dict(model.named_modules())[PRESET_LAYERS[name][-1]].register_forward_hook(stop)

    def run():
        with torch.inference_mode():
            for start in range(0, len(inputs), step):
                try:
                    model(inputs[start:start + step])
                except _LastLayerDone:
                    pass

    return 1000 * best_time(run) / len(inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--backbones", nargs="+", default=list(PRESET_LAYERS))
    args = parser.parse_args()
    images = torch.randn(args.batch, 3, args.size, args.size)
    rows = []
    for name in args.backbones:
        extractor = FeatureExtractor(name, weights=None)
        truncated = best_time(lambda: extractor(images))
        # The same model without hooks runs to its classifier, with the same memory layout and
        # the same passes, so that only the skipped layers make the difference.
        model = torchvision.models.get_model(name, weights=None).eval()
        model = model.to(memory_format=torch.channels_last)
        layout = images.contiguous(memory_format=torch.channels_last)

        def full_forward():
            with torch.inference_mode():
                for start in range(0, len(layout), CPU_MICRO_BATCH):
                    model(layout[start:start + CPU_MICRO_BATCH])

        full = best_time(full_forward)
        rows.append({"backbone": name, "layers": ",".join(extractor.layers), "batch": args.batch,
                     "full forward s": full, "truncated s": truncated,
                     "saving %": 100.0 * (1 - truncated / full)})
    layouts = []
    for name in args.backbones:
        for channels_last in (True, False):
            for step in (CPU_MICRO_BATCH, 16):
                layouts.append({"backbone": name,
                                "layout": "channels-last" if channels_last else "NCHW",
                                "images per pass": step,
                                "ms per image": truncated_ms_per_image(
                                    name, torch.randn(16, 3, args.size, args.size), channels_last,
                                    step),
                                "knnad's": channels_last and step == CPU_MICRO_BATCH})
    write_results("truncation", {"Full forward pass against the hooked, truncated one": rows,
                                 "Truncated pass: layout and images per pass (16 images)": layouts})


if __name__ == "__main__":
    main()
