"""ShapesVQA: the synthetic benchmark whose question types need different visual granularity."""

from cliviz.data.dataset import Sample, iter_samples, scene_with_questions, write_dataset
from cliviz.data.questions import QUESTION_TYPES, vocabulary

__all__ = ["QUESTION_TYPES", "Sample", "iter_samples", "scene_with_questions", "vocabulary", "write_dataset"]
