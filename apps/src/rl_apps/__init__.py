"""Entry points that assemble the framework's packages into training programs."""
