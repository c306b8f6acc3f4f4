"""Making quantized checkpoints (M7): the algorithms and the driver, one idea per module.

``grid`` (codes, scales, zero points), ``rtn`` (round to nearest), ``gptq`` (Frantar et al. 2022),
``packing`` (the GPTQ checkpoint format), ``calibration`` (Python's own docs as data),
``perplexity`` (the quality measure) and ``quantize`` (model in, checkpoint out). The first five
import only torch, so the loader can read the format without pulling in the driver.
"""
