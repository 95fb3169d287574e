"""FE-CLIP's peers, run through the toolkit's own data, metrics and report (issue 18).

Each module holds one method as a ``torch.nn.Module`` over a frozen open_clip model, with the
contract of :mod:`feclip.methods.base`: ``forward(images) -> MethodOutput`` (the method's own image
scores and anomaly maps, computed exactly as its authors' code does), and, for the methods that
train, ``trainable_state_dict()`` and ``loss(output, masks, labels)``.
"""
