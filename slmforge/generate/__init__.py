"""Guided synthetic data generation: teachers, generators (extractive and model-written) and verifiers."""

from slmforge.generate.pipeline import make_items
from slmforge.generate.teachers import TeacherError, make_teacher, teacher_request

__all__ = ["make_items", "make_teacher", "teacher_request", "TeacherError"]
