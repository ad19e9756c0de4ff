"""How much a FeatureExtractor saves by stopping after its last hooked layer.

Times, in one run, the full classification forward pass against the hooked, truncated pass
for each backbone's preset layers. Random weights: the cost does not depend on their values.
"""
import argparse

import torch
import torchvision

from knnad.backbones import CPU_MICRO_BATCH, PRESET_LAYERS, FeatureExtractor

from _common import best_time, write_results


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
        model = torchvision.models.get_model(name, weights=None).eval().to(memory_format=torch.channels_last)
        layout = images.contiguous(memory_format=torch.channels_last)

        def full_forward():
            with torch.inference_mode():
                for start in range(0, len(layout), CPU_MICRO_BATCH):
                    model(layout[start:start + CPU_MICRO_BATCH])

        full = best_time(full_forward)
        rows.append({"backbone": name, "layers": ",".join(extractor.layers), "batch": args.batch,
                     "full forward s": full, "truncated s": truncated,
                     "saving %": 100.0 * (1 - truncated / full)})
    write_results("truncation", {"Full forward pass against the hooked, truncated one": rows})


if __name__ == "__main__":
    main()
