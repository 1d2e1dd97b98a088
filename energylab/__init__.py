"""energylab: the linear auxiliary transform AuxT and energy-compaction statistics for learned image
compression (Li et al., *On Disentangled Training for Nonlinear Transform in Learned Image
Compression*, ICLR 2025). The README indexes the modules and commands."""

import warnings

# CompressAI 1.2.8 imports torch_geometric (its point-cloud datasets), whose module-level
# ``torch.jit.script`` calls make torch warn (attributed to torch.jit._script) on every import: a
# deprecation inside dependencies that users cannot act on, printed before every command's first line.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
                        module=r"torch\.jit\._script")
