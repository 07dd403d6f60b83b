"""The project's tests; a package so that ``tests.fixtures`` imports the same way from every test and conftest."""
