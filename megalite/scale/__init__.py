"""megalite-scale: IsoFLOP scaling studies (plan -> run -> fit -> recommend)."""
