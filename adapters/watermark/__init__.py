"""The watermark adapter: a LoRA on the VAE decoder (or a whole fine-tuned decoder) that writes the owner's key into
every image; applied as the watermark, never as a concept (:mod:`pipelines.watermark` merges and verifies it)."""
from adapters.adapter_type import AdapterType, LibraryColumn

METHODS = ("watermark",)  # atelier.method of a decoder LoRA (a full-decoder file is not an adapter)

ADAPTER = AdapterType(
    name="watermark", label="Watermark (VAE decoder)", summary="your key in every image the model decodes",
    reader="lora", order=4, role="decoder", detect=lambda meta: meta.get("atelier.method") in METHODS,
    columns=(LibraryColumn("key bits", "atelier.watermark_bits"),))
