"""Visual question answering: the official VQA accuracy (``accuracy``), the record formats of the VQA sets
(``records``), the ten FRAMES-VQA set roles (``sets``) and the CLIP VQA models (``model``)."""
