"""Ready-made generation pipelines with diffattn presets (installed as ``diffattn.pipelines``)."""
