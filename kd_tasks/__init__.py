"""kd-tasks: knowledge distillation for detection, face recognition and BERT-style NLP."""

__version__ = "0.1.0"
