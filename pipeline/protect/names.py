"""The protection methods' names, importable without torch: the command line lists them before any work starts.

The gradient methods' registry (`pipeline.protect.methods.METHODS`) must hold exactly `GRADIENT_METHODS`, in this
order (checked when `pipeline.protect.engine` is imported), so this stays the one list.
"""

GRADIENT_METHODS = ("advdm", "advdm-", "photoguard", "mist", "sds+", "sds-", "sdst-")  # pipeline.protect.methods
FASTPROTECT_METHODS = ("fastprotect", "fastprotect+pgd")  # pipeline.protect.fastprotect.infer
GROUP_METHODS = ("aspl",)  # protect a group's images together (pipeline.protect.aspl; the pipeline batches groups)
ALL_METHODS = GRADIENT_METHODS + FASTPROTECT_METHODS + GROUP_METHODS
