"""The probe's stages after loading: prepare the model, discover its sites, measure them, summarize."""
