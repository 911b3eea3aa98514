"""SeqIO task and mixture registrations (import a submodule to register its tasks)."""
