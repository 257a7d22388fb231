"""Guided synthetic data generation: teachers, generators (extractive and model-written) and verifiers."""

from slmforge.generate.pipeline import make_items
from slmforge.generate.teachers import OpenAITeacher, Teacher, TeacherError, TransformersTeacher, make_teacher

__all__ = ["make_items", "make_teacher", "Teacher", "TeacherError", "OpenAITeacher", "TransformersTeacher"]
