"""Developer tools around the sync, not part of it: `python -m devtools.demo` (`make demo`) and
`python -m devtools.devserver` (`make up`). Both start the sandbox through `sandbox.process`; the
production image ships neither these nor the sandbox."""
