def rank_scale(): pass
