"""Mutation testing of our own: does the test suite notice when one operator or constant of a module changes?"""
