"""One module per dataset family; each turns its real file layout into samples (see tinygpt.data.registry)."""
